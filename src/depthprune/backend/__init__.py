"""Model backends: the one interface scoring, searches, compensation, evaluation and surgery run on.

``InMemoryBackend`` wraps a loaded model; ``StreamedBackend`` (``load_streamed``) keeps the weights on disk and
materialises one layer at a time. ``open_backend`` picks one for a model source. See :mod:`.base`.
"""

from .base import Backend, NeedsMemoryError, originals
from .calls import LayerCall, final_states, record_calls
from .checkpoint import Checkpoint, StreamingError, weights_bytes
from .memory import InMemoryBackend
from .states import StateStore, available_memory, format_size, parse_size
from .streamed import MemoryPlan, StreamedBackend, load_streamed
from .walk import Meter, Stack, Walker, count_work, metered, walk_layers

__all__ = [
    "Backend",
    "Checkpoint",
    "InMemoryBackend",
    "LayerCall",
    "Meter",
    "MemoryPlan",
    "NeedsMemoryError",
    "Stack",
    "StateStore",
    "StreamedBackend",
    "StreamingError",
    "Walker",
    "available_memory",
    "count_work",
    "final_states",
    "format_size",
    "load_streamed",
    "metered",
    "originals",
    "parse_size",
    "record_calls",
    "walk_layers",
    "weights_bytes",
]
