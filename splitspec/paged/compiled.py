"""Compiled forward passes: `torch.compile` (inductor) of a model's forward as the paged runner
calls it, with the settings each device wants, dynamic shapes and a count of the graphs built.

CPU: freezing (weights become constants of the graph) and weight prepacking (oneDNN/MKL blocked
layouts for the linear layers), which is what makes a forward of a few tokens cost about what one
token costs; vLLM's CPU backend relies on the same two. CUDA: CUDA graphs (inductor's cudagraph
trees record one graph per shape it meets). Shapes are dynamic from the first call, so a new batch
size or context length does not recompile; what does recompile (a new branch of the attention
metadata) is counted in `compiles`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


RECOMPILE_LIMIT = 64  # a worker builds 2 graphs; a test process compiles many models (Dynamo's default: 8)


def export_compiles(registry: Any, counter: Callable[[], int]) -> None:
    """`splitspec:compiled_graphs` in `registry`: graphs compiled so far (recompiles included)."""
    from prometheus_client import Gauge

    Gauge("splitspec:compiled_graphs", "Graphs torch.compile built (0: eager)", registry=registry).set_function(counter)


def inductor_patches(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"triton.cudagraphs": True}
    return {"freezing": True, "cpp.weight_prepack": True}


@dataclass(slots=True, eq=False)
class CompiledForward:
    model: Any
    device: torch.device
    compiles: int = 0                    # graphs inductor compiled (recompiles and graph breaks included)
    function: Callable = field(init=False)

    def __post_init__(self) -> None:
        self.function = torch.compile(self.model, backend=self._compile_graph, dynamic=True)

    def _compile_graph(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(graph, example_inputs)

    def __call__(self, dynamic_dims: tuple[tuple[torch.Tensor, tuple[int, ...]], ...] = (), **inputs: Any) -> Any:
        """`dynamic_dims`: (tensor, dims) pairs to mark dynamic on this call (each size >= 2).
        The inductor settings hold while Dynamo traces too: freezing decides there whether the
        weights are graph constants or inputs. Python floats (scales, epsilons) are constants of
        the model, so they specialize rather than cost a second trace. Dynamo's recompile limit
        counts the graphs of every model this process compiled through the same forward code;
        past it Dynamo would run the forward eagerly, silently."""
        from torch._dynamo import config as dynamo_config
        from torch._inductor import config as inductor_config

        for tensor, dims in dynamic_dims:
            torch._dynamo.mark_dynamic(tensor, dims)
        with inductor_config.patch(inductor_patches(self.device)), dynamo_config.patch(
                specialize_float=True, recompile_limit=RECOMPILE_LIMIT):
            return self.function(**inputs)
