"""Compiled forward passes: `torch.compile` (inductor) of a model's forward as the paged runner
calls it, with the settings each device wants, dynamic shapes and a count of the graphs built.

CPU: graphs for steps of up to `max_tokens` tokens (a decode step, a verify of k + 1 of one
sequence, a few sequences' decode steps), compiled with freezing (weights become constants of
the graph), q/k/v and gate/up concatenated, and inductor's C++ micro-GEMM templates for every
linear (`max_autotune` with the CPP backend, the ATen choices dropped where a template applies).
On few rows a GEMM is bound by reading the weights, and the templates, fused with the norms and
activations around them, stream them faster than oneDNN. Longer steps run eagerly on the
oneDNN-packed linears (`packed_linear.py`). Where the two cross is the CPU's: on an AVX-512 VM
oneDNN won from about 6 rows on until the micro-GEMMs were held to 6-row register blocks
(`prefer_short_register_blocks`), the graphs then won up to 32; on an AVX2 one the graphs won at
32 (README, forward cost). The limit starts at `GRAPH_TOKENS["cpu"]` and a worker measures it at
start (`PagedRunner.calibrate`). A model whose weights stream from memory may take oneDNN's GEMM
for the batch graph's linears instead, where that measures faster (`use_batch_gemms`); in float32
where the streamed linear kernel builds, its packed linears call that kernel in every graph
instead (`PagedRunner`, `packed_linear.py`), and neither templates nor oneDNN run there. CUDA: CUDA
graphs (inductor's cudagraph trees record one graph per shape), for steps of any size. Two
graphs serve every compiled step: one token of one sequence, and a padded batch whose sizes are
dynamic, so a new batch size or context length does not recompile; what does recompile (a new
branch of the attention metadata) is counted in `compiles`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


GRAPH_TOKENS = {"cpu": 5}  # device type -> most tokens a compiled forward takes before calibration (absent: no limit)
RECOMPILE_LIMIT = 64  # a worker builds 2 graphs; a test process compiles many models (Dynamo's default: 8)


def compiles_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a worker compiles by default (`--enforce-eager` aside): everywhere but a CPU in a
    half-precision dtype, where inductor's bfloat16 templates measured slower than the eager
    oneDNN-packed linears at every step size (README, `--dtype bfloat16`: 11.8 against 7.2 ms
    for one token, 17.5 against 7.9 for a verify of 4)."""
    return device.type != "cpu" or dtype == torch.float32


def export_compiles(registry: Any, counter: Callable[[], int]) -> None:
    """`splitspec:compiled_graphs` in `registry`: graphs compiled so far (recompiles included)."""
    from prometheus_client import Gauge

    Gauge("splitspec:compiled_graphs", "Graphs torch.compile built (0: eager)", registry=registry).set_function(counter)


def inductor_patches(device: torch.device) -> dict[str, Any]:
    """The inductor settings of a device's graphs. On the CPU, `cpp_wrapper`: each graph's calls
    (a forward of the pair's target makes ~110 of them: 49 linears, 12 attentions, fused
    kernels) from generated C++, not Python; 5-6% off a padded batch step (4 x 1 tokens: 23.0
    against 21.8 ms; 16 x 1: 38.5 against 36.2), 2% off one token (17.05 against 16.75), 5-10%
    off the draft's, for ~10 s more compile per graph (README, forward cost)."""
    if device.type == "cuda":
        return {"triton.cudagraphs": True}
    return {"freezing": True, "cpp.weight_prepack": True, "cpp.enable_concat_linear": True, "cpp_wrapper": True,
            "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "post_grad_custom_post_pass": _source_key()}


SHORT_REGISTER_BLOCK = (6, 32, 1)  # rows x columns x k of inductor's float32 AVX-512 micro-GEMM


def prefer_short_register_blocks() -> None:
    """Inductor's float32 AVX-512 micro-GEMM kernels limited to SHORT_REGISTER_BLOCK (it offers
    8 x 48, 8 x 32 and 16 x 16, and takes 8 x 32 for these models). Its 8-row kernel ran 7 and
    more rows 2.3-2.8x slower than 6 (a 512 x 4096 linear on one AMD EPYC core, weights in cache:
    791 us for 7 rows and 867 for 8 against 279 for 6; oneDNN 745 for 8): the graphs lost to the
    eager packed linears from 8 rows on, and a verify of 4 sequences x 2 tokens cost 2.5x a decode
    step of 4. With 6 x 32: 348 us for 7 rows, 382 for 8, 750 for 16 (8 x 32: 1660), 1437 for 32
    (3301). Six rows of two AVX-512 vectors hold 12 accumulators; AVX2 machines keep inductor's
    own choices (4-8 rows of 8-float vectors)."""
    import torch._inductor.select_algorithm  # noqa: F401 - loads inductor in an order its modules import cleanly
    from torch._inductor.codegen import cpp_micro_gemm
    from torch._inductor.cpu_vec_isa import VecAVX512

    fp32_vec = cpp_micro_gemm.CppMicroGemmFP32Vec
    configs = cpp_micro_gemm.micro_gemm_configs[fp32_vec]
    short = cpp_micro_gemm.generate_gemm_config(VecAVX512, [SHORT_REGISTER_BLOCK], input_dtype=torch.float)
    if configs[: len(short)] == short:
        return
    others = [c for c in configs if not (c.vec_isa_cls is VecAVX512 and c.input_dtype == torch.float
                                         and c.input2_dtype == torch.float and c.output_dtype == torch.float)]
    cpp_micro_gemm.micro_gemm_configs[fp32_vec] = short + others


@functools.cache
def _source_key() -> Any:
    """A post-grad pass that changes nothing: its uuid, this file's hash, enters inductor's cache
    keys, which do not see the choices made here (the choice filter, the register blocks), so a
    graph compiled before a change to them is never loaded from the cache. Built on first use:
    importing inductor is not work for import time."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class SourceKey(CustomGraphPass):
        def __call__(self, graph: torch.fx.graph.Graph) -> None:
            return None

        def uuid(self) -> str:
            return get_hash_for_files((__file__,)).hex()

    return SourceKey()


def prefer_cpp_templates(choices: list[Any]) -> list[Any]:
    """Inductor's autotuning choices for one GEMM, narrowed to its generated kernels (on CPU: the
    C++ templates) where there are any, so the ATen kernel is the fallback, not a rival.
    Autotuning would time each choice on its own, with the weight hot in cache, and often pick
    oneDNN; in a forward every weight comes from memory, where the templates win. One choice
    left also means nothing to time, which keeps compiling fast."""
    from torch._inductor.select_algorithm import ExternKernelCaller

    generated = [choice for choice in choices if not isinstance(choice, ExternKernelCaller)]
    return generated or choices


def _register_choice_filter() -> None:
    """Inductor keeps one algorithm selector per process; add the filter to it once."""
    from torch._inductor.select_algorithm import get_algorithm_selector_cache

    selector = get_algorithm_selector_cache()
    if prefer_cpp_templates not in selector.preprocessing_fns:
        selector.add_preprocessing_fn(prefer_cpp_templates)


@dataclass(slots=True, eq=False)
class CompiledForward:
    model: Any
    device: torch.device
    overrides: dict[str, Any] = field(default_factory=dict)  # inductor settings over the device's (A/B runs)
    compiles: int = 0                    # graphs inductor compiled (recompiles and graph breaks included)
    function: Callable = field(init=False)
    patches: dict[str, Any] = field(init=False)  # the inductor settings of every call: the device's, then `overrides`
    max_tokens: int | None = field(init=False)  # longest step the graphs take (None: any)
    batch_gemms: str = "templates"  # the padded batch graph's linears: "templates" (C++ micro-GEMMs) or "onednn"
    batch_function: Callable | None = field(init=False, default=None)  # the batch graph, where it differs

    def __post_init__(self) -> None:
        # No guards on the model's modules and parameters (checking them cost 0.3-0.4 ms a call on
        # the 48M target, 5% of a decode step): a runner never changes its model after compiling,
        # and its graphs are its own (compiled by its own backend, kept apart by
        # isolate_recompiles), so another model of the same class in this process never runs them.
        self.function = self._compile(self._compile_graph)
        self.max_tokens = GRAPH_TOKENS.get(self.device.type)
        self.patches = {**inductor_patches(self.device), **self.overrides}
        gemms, self.batch_gemms = self.batch_gemms, "templates"  # the graphs built so far
        self.use_batch_gemms(gemms)

    def _compile(self, backend: Callable) -> Callable:
        return torch.compile(self.model, backend=backend, dynamic=True, isolate_recompiles=True,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def use_batch_gemms(self, gemms: str) -> None:
        """The padded batch graph's linears from now on: "templates" (the graph the one-token
        graph comes with) or "onednn" (oneDNN's packed GEMM called from the graph; a graph of its
        own, compiled on its first call). Which is faster is the CPU's and the model's: on one
        with AMX (Xeon 4th gen) oneDNN ran a 48M target's batches of 4-32 rows 15-30% faster, the
        templates a 1.5M draft's (its weights stay in cache) 5-35% faster
        (`PagedRunner.choose_batch_gemms` times both at start)."""
        if gemms not in ("templates", "onednn"):
            raise ValueError(f"batch_gemms: expected templates or onednn, got {gemms!r}")
        if gemms == self.batch_gemms:
            return  # keeps the graph it has (a new torch.compile would build it again)
        self.batch_gemms = gemms
        self.batch_function = self._compile(self._compile_onednn_batch) if gemms == "onednn" else None

    def takes(self, tokens: int) -> bool:
        """Whether a step of `tokens` new tokens runs through the graphs (else eagerly)."""
        return self.max_tokens is None or tokens <= self.max_tokens

    def _compile_graph(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        if self.device.type == "cpu":
            _register_choice_filter()
            prefer_short_register_blocks()
        return compile_fx(graph, example_inputs)

    def _compile_onednn_batch(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The batch graph with every linear an extern call to oneDNN on packed weights (no
        autotuning: inductor then lowers a linear to oneDNN's, not to a template)."""
        from torch._inductor import config as inductor_config

        with inductor_config.patch(max_autotune=False):
            return self._compile_graph(graph, example_inputs)

    def __call__(self, dynamic_dims: tuple[tuple[torch.Tensor, tuple[int, ...]], ...] = (), **inputs: Any) -> Any:
        """`dynamic_dims`: (tensor, dims) pairs to mark dynamic on this call (each size >= 2).
        The inductor settings hold while Dynamo traces too: freezing decides there whether the
        weights are graph constants or inputs. Python floats (scales, epsilons) are constants of
        the model, so they specialize rather than cost a second trace. Dynamo's recompile limit
        counts the graphs of every model this process compiled through the same forward code;
        past it Dynamo would run the forward eagerly, silently."""
        from torch._dynamo import config as dynamo_config
        from torch._inductor import config as inductor_config

        batch = False
        for tensor, dims in dynamic_dims:
            torch._dynamo.mark_dynamic(tensor, dims)
            batch = batch or tensor is inputs.get("input_ids")  # the padded batch: its token count varies
        function = self.batch_function if batch and self.batch_function is not None else self.function
        with inductor_config.patch(self.patches), dynamo_config.patch(
                specialize_float=True, recompile_limit=RECOMPILE_LIMIT):
            return function(**inputs)
