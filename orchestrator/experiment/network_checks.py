"""Networks a check inspects, built once: the schema's checks of `student`/`teacher`, a teacher checkpoint's
architecture, a method's own `check_setup`."""

from __future__ import annotations

import functools
import json
from typing import Any

from methods.networks import build_network


def checked_network(architecture: str, args: dict[str, Any], features: list[str] | None = None, *, num_classes: int,
                    in_channels: int, image_size: int) -> Any:
    """The network a check inspects (never trains): built once per distinct architecture, arguments and data shape,
    however many points of a design or study name it (`_built`)."""
    return _built(architecture, json.dumps(args, sort_keys=True, default=str), tuple(features or ()) or None,
                  num_classes, in_channels, image_size)


# functools' memo, bounded: the last few distinct networks a driver checked (a sweep's student and teacher, a
# study's few students), so each is built once; a check only reads a network, so sharing it is safe.
@functools.lru_cache(maxsize=4)
def _built(architecture: str, args: str, features: tuple[str, ...] | None, num_classes: int, in_channels: int,
           image_size: int) -> Any:
    return build_network(architecture, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         features=features, **json.loads(args))
