"""GeGLU: the gated MLP of Gemma and T5 v1.1 — SwiGLU with a (tanh) GELU gate."""

from __future__ import annotations

from ..core import Foreign
from ..mlp.spec import mlp_op

OPS = (
    # gate_proj / up_proj / down_proj, as Hugging Face names them: a checkpoint's MLP
    # weights load as they are, and tensor parallelism splits gate and up by columns.
    mlp_op("geglu", "GeGLU MLP: down(gelu_tanh(gate(x)) * up(x)).",
           ("gate_proj", "up_proj", "down_proj"), bias=False, class_name="GeGLU",
           # Hugging Face's gated MLPs with the tanh GELU (Gemma's)
           foreign={"hf": Foreign("mlp", {"hidden_act": ("gelu_pytorch_tanh",)})}),
)
