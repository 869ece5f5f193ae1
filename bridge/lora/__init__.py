"""LoRA and textual inversion: resolved on CivitAI, verified and cached on disk within a budget, applied to
the resident model for one job and taken out again.

* `civitai`   the CivitAI API client (configurable base URL, metadata cached on disk, final errors kept).
* `store`     the on-disk LoRA/TI cache: sha256-verified resumable downloads, byte budget, LRU eviction.
* `weights`   reading LoRA files (diffusers' converters) and TI embeddings (A1111 layouts).
* `patch`     merging LoRAs into a model's weights and restoring the exact original bytes afterwards.
* `prompts`   prompt embeddings with TI vectors at their strength.
* `plan`      one job's LoRAs/TIs: resolution, baseline checks, trigger injection, gen_metadata.
* `service`   the worker's LoRA support as one object (pop flag, back-off, prefetch).
"""
