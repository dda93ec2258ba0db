"""Layer streaming: score, prune and evaluate models larger than memory, one decoder layer at a time.

``load_streamed`` builds an empty-weight skeleton; the scoring functions pass
every calibration batch through one materialised layer before loading the
next; ``write_pruned_checkpoint`` applies a plan from disk to disk;
``run_streamed_job`` is the prune job on top of them.
"""

from .checkpoint import Checkpoint, StreamingError, weights_bytes
from .choose import StreamChoice, choose_streaming
from .job import STREAMED_METHODS, check_streamable, run_streamed_job, streamed_plan
from .model import StreamedModel, load_streamed
from .scoring import streamed_layer_similarity, streamed_layer_statistics, streamed_perplexity
from .states import StateStore, parse_size
from .surgery import write_pruned_checkpoint

__all__ = [
    "Checkpoint",
    "STREAMED_METHODS",
    "StateStore",
    "StreamChoice",
    "StreamedModel",
    "StreamingError",
    "check_streamable",
    "choose_streaming",
    "load_streamed",
    "parse_size",
    "run_streamed_job",
    "streamed_layer_similarity",
    "streamed_layer_statistics",
    "streamed_perplexity",
    "streamed_plan",
    "weights_bytes",
    "write_pruned_checkpoint",
]
