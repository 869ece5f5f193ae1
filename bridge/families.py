"""The job families: one horde worker identity each, and the keys the loop shares its run slots between.

The daemon never tests for a particular family: every `JobSource` and `Job` declares its family, and the loop
treats the names as opaque keys (queues, shares, counters). This is the one list of them; the config checks
`family_shares` against it and the journal records it with every in-flight id.
"""

GENERATION = "generation"  # generate/pop: the dreamer
ALCHEMY = "alchemy"  # interrogate/pop: the alchemist
FAMILIES = (GENERATION, ALCHEMY)
