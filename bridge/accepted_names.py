"""Which form and post-processor names the server accepts, read from its published API description.

The horde refuses a whole interrogation pop (400) when its `forms` list holds one name the server does not
know; to this worker such a 400 means "our request is malformed" and would stop it. So the worker offers
only names listed in the server's swagger document (`/api/swagger.json`, flask-restx's Swagger 2.0):
`definitions.InterrogationPopInput.properties.forms.items.enum` for forms and the `post_processing` enum of
the generation payload (`ModelPayloadStyleStable`) for post-processors.

The document is read at start (the first pop) and again on reload: every REFRESH_S, and at once after the
horde refused a pop over a form name (a withdrawn name). If it cannot be read or parsed, the worker's own
list (bridge/horde_names.py) is used and the read is retried at the next refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge import horde_names
from bridge.errors import HordeError

if TYPE_CHECKING:
    from bridge.horde_api import HordeClient

logger = logging.getLogger(__name__)

REFRESH_S = 3600.0
RETRY_S = 300.0  # after a failed read


@dataclass(frozen=True)
class AcceptedNames:
    forms: frozenset[str]
    post_processors: frozenset[str]
    source: str  # "swagger" or "built-in"

    @classmethod
    def built_in(cls) -> AcceptedNames:
        return cls(frozenset(horde_names.FORMS), frozenset(horde_names.POST_PROCESSORS), "built-in")


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _enum_of_list_property(definitions: Mapping[str, Any], prop: str, prefer: str) -> list[str] | None:
    """The string enum of an array property `prop`, from definition `prefer` or else any definition."""
    candidates = [definitions.get(prefer)] + [d for k, d in definitions.items() if k != prefer]
    for definition in candidates:
        for node in _walk(definition):
            props = node.get("properties")
            if not isinstance(props, Mapping) or not isinstance(props.get(prop), Mapping):
                continue
            enum = (props[prop].get("items") or {}).get("enum")
            if isinstance(enum, list) and all(isinstance(e, str) for e in enum):
                return list(enum)
    return None


def parse_swagger(document: Mapping[str, Any]) -> AcceptedNames:
    """The accepted names in a swagger document; ValueError when it does not list them."""
    definitions = document.get("definitions")
    if not isinstance(definitions, Mapping):
        raise ValueError("the API description has no definitions")
    forms = _enum_of_list_property(definitions, "forms", "InterrogationPopInput")
    if not forms:
        raise ValueError("the API description lists no alchemy forms (InterrogationPopInput.forms)")
    post = _enum_of_list_property(definitions, "post_processing", "ModelPayloadStyleStable")
    if post is None:
        # Post-processor forms are forms too: the form enum is the authority for what may be popped.
        post = [name for name in forms if name in horde_names.POST_PROCESSORS]
    return AcceptedNames(frozenset(forms), frozenset(post), "swagger")


def refused_forms(error: HordeError, offered: Iterable[str]) -> list[str] | None:
    """The offered form names a 400 validation error of an interrogation pop refused (`forms.<i>` keys),
    [] when the refusal concerns `forms` without naming an index, None when it is about something else."""
    if error.status != 400 or not error.errors:
        return None
    offered = list(offered)
    keys = [str(key) for key in error.errors if str(key).split(".")[0] == "forms"]
    if not keys:
        return None
    refused = []
    for key in keys:
        _, _, index = key.partition(".")
        if index.isdigit() and int(index) < len(offered):
            refused.append(offered[int(index)])
    return refused


class AcceptedNamesCache:
    """The server's accepted names, read when due; the built-in list while none could be read."""

    def __init__(self, *, refresh_s: float = REFRESH_S, retry_s: float = RETRY_S) -> None:
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self._names: AcceptedNames | None = None
        self._refused: dict[str, float] = {}  # name -> until when it is not offered
        self._due = 0.0
        self._lock = threading.Lock()

    def current(self, client: HordeClient) -> AcceptedNames:
        with self._lock:
            if time.monotonic() >= self._due:
                self._read(client)
            names = self._names or AcceptedNames.built_in()
            now = time.monotonic()
            self._refused = {name: until for name, until in self._refused.items() if until > now}
            if self._refused:
                names = AcceptedNames(names.forms - set(self._refused), names.post_processors, names.source)
            return names

    def reload(self, refused: Iterable[str] = ()) -> None:
        """Read the document again before the next pop; `refused` names are not offered meanwhile."""
        with self._lock:
            # A refused name stays out for a refresh period even if the document still lists it: a server
            # whose description and validation disagree must not get the same bad pop every few seconds.
            until = time.monotonic() + self.refresh_s
            self._refused.update(dict.fromkeys(refused, until))
            self._due = 0.0

    def _read(self, client: HordeClient) -> None:
        try:
            names = parse_swagger(client.swagger())
        except (HordeError, ValueError, TypeError) as exc:
            logger.warning(
                "could not read the horde's API description (%s): offering the forms this worker "
                "knows; trying again in %.0f s",
                exc,
                self.retry_s,
            )
            self._due = time.monotonic() + self.retry_s
            return
        self._names = names
        self._due = time.monotonic() + self.refresh_s
        unknown_here = sorted(names.forms - set(horde_names.FORMS))
        if unknown_here:
            logger.info("the horde accepts forms this worker does not know: %s", ", ".join(unknown_here))
