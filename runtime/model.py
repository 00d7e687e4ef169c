"""Running a model: decomposed layers in C, everything else in onnxruntime segments.

    m = bdecomp.load("model.bd.onnx")            # backend="native" (default) or "onnxruntime"
    logits = m.run(x)[0]                         # x float32 [N, 3, H, W]

`backend="onnxruntime"` runs the whole file in stock onnxruntime through the custom ops' function
bodies (the oracle). Original (non-decomposed) models run as one onnxruntime session either way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from bdecomp.decomposer import ops
from bdecomp.decomposer.convert import META_PREFIX
from bdecomp.decomposer.feed import fixed_batch, input_dtype, model_input, run_batched
from bdecomp.decomposer.load import read_model
from bdecomp.errors import ConfigError, DecomposedModelError, ModelError
from bdecomp.runtime import chains
from bdecomp.runtime.graph import LayerSpec, QuantSpec, Step, all_inputs, build_schedule

BACKENDS = ("native", "onnxruntime")


def session_options(threads: int | None) -> ort.SessionOptions:
    """Every session of the package: fatal log level only, `threads` intra-op threads."""
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: failures become one ModelError line, not an extra log line
    # workers spin during a run (onnxruntime's speed) but stop when it returns: left spinning they
    # would take the cores whatever runs next needs (the native runtime after an onnxruntime
    # baseline in `compare`)
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _session(model: onnx.ModelProto, threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load the model: {msg[:300]}") from None


class _Quantized:
    """A quantizer's result, packed lazily per group count (consumers with different groups each
    get the layout they read)."""

    def __init__(self, x: np.ndarray, spec: QuantSpec, scale: float, zero_point: int, threads: int | None,
                 packers: dict | None = None):
        """packers: the quantizer step's bound quantize_pack calls by (shape, groups, axis, the
        kernels' environment) — static quantizers only (a dynamic one has a new scale each run)."""
        self.x, self.spec, self.scale, self.zero_point, self.threads = x, spec, scale, zero_point, threads
        self.packers = packers
        self._packed: dict[tuple[int, int], np.ndarray] = {}

    def pack_options(self, groups: int, channel_axis: int) -> dict:
        """quantize_pack's keyword options for this quantizer's codes in a layout (also what a chain's
        quantize + pack step is given: the same codes either way)."""
        return dict(groups=groups, scale=self.scale, zero_point=self.zero_point, bits=self.spec.bits,
                    channel_axis=channel_axis, threads=self.threads, channel_scales=self.spec.channel_scales)

    def packed(self, groups: int, channel_axis: int, envk: tuple = ()) -> np.ndarray:
        key = (groups, channel_axis)
        act = self._packed.get(key)
        if act is None:
            options = self.pack_options(groups, channel_axis)
            if self.packers is None:
                act = _native().quantize_pack(self.x, **options)
            else:
                pkey = (self.x.shape, groups, channel_axis, envk)
                f = self.packers.get(pkey)
                if f is None:
                    if len(self.packers) >= 16:
                        self.packers.clear()
                    f = self.packers[pkey] = _native().bind_quantize_pack(self.x, **options)
                act = f(self.x)
            self._packed[key] = act
        return act

    def packed_im2col(self, spec: LayerSpec) -> tuple[np.ndarray, int, int, int]:
        """Packed patches of a 1×1-equivalent convolution: (act, n, oh, ow), im2col, quantize and
        pack in one C pass.  Padded taps get the code z (of 0.0), so the zero-padding correction is
        implicit."""
        native = _native()
        key = _im2col_key(spec)
        if key not in self._packed:
            self._packed[key] = native.im2col_quantize_pack(
                self.x, kernel=spec.weight_shape[2:], strides=spec.strides, pads=spec.pads,
                dilations=spec.dilations, scale=self.scale, zero_point=self.zero_point,
                bits=self.spec.bits, threads=self.threads, channel_scales=self.spec.channel_scales)
        return self._packed[key]

    def forget_im2col(self, spec: LayerSpec) -> None:
        """Drop the cached patches of `spec` (timing the patch path includes building them)."""
        self._packed.pop(_im2col_key(spec), None)

    def native_codes(self) -> np.ndarray:
        """uint8 codes of x (NCHW), for the depthwise kernel; computed once."""
        native = _native()
        if "codes" not in self._packed:
            self._packed["codes"] = native.quantize_codes(
                self.x, scale=self.scale, zero_point=self.zero_point, bits=self.spec.bits,
                channel_scales=self.spec.channel_scales, threads=self.threads)
        return self._packed["codes"]

    def codes(self) -> np.ndarray:
        from bdecomp.runtime.reference import quantize

        s = self.spec.channel_scales
        if s is not None:
            s = s.reshape(-1, 1, 1) if self.spec.channel_ndim == 3 else s
        return quantize(self.x, self.scale if s is None else s, self.zero_point, self.spec.bits)


_NATIVE = None


def _native():
    """bdecomp.native, imported on first use (the onnxruntime backend works without the build)."""
    global _NATIVE
    if _NATIVE is None:
        from bdecomp import native

        _NATIVE = native
    return _NATIVE


def _im2col_key(spec: LayerSpec) -> tuple:
    """The _Quantized cache key of a layer's packed patches (layers of the same geometry share them)."""
    return ("im2col", spec.weight_shape[2:], spec.strides, spec.pads, spec.dilations)


IM2COL_MAX_BYTES = 64 << 20
HEAVY_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Attention", "Einsum"}
_DEPTHWISE = -1  # the "groups" of a layer plan run by the depthwise kernel (straight from codes)
MAX_OUTPUT_ELEMS = 1 << 30  # one native layer's output (4 GiB of float32): refused before allocating


def use_im2col(spec: LayerSpec) -> bool:
    """Few input channels waste most of each 64-bit word per tap (3 of 64 bits in a first
    layer); packing whole patches instead needs ceil(D/64) words instead of taps·ceil(Cg/64)."""
    if spec.op != ops.CONV or spec.group != 1:
        return False
    taps = spec.weight_shape[2] * spec.weight_shape[3]
    return taps > 1 and -(-spec.depth // 64) < taps * -(-spec.weight_shape[1] // 64)


def kernel_choices(kernel, patch_kernel, isa: str | None) -> list[tuple[Any, str, bool]]:
    """The ways a layer can run: (kernel, family, packed patches?).  Which is fastest depends on
    the machine and the layer (on an AVX-512 VPOPCNTDQ Zen 4, SqueezeNet at k=Q=4 runs fire3-squeeze
    on popcount and every other layer on the lookup tables, ResNet-18 all of them; patches pay
    where few channels waste the bits of every word), so run() times them on the first input of
    each shape.  The results are bit-identical; only the time differs.
    BDECOMP_KERNEL=lut|popcount forces the family (direct convolution preferred for lut)."""
    kernel.family(isa)  # validates BDECOMP_KERNEL
    forced = os.environ.get("BDECOMP_KERNEL", "auto") or "auto"
    out = [(k, fam, patch) for k, patch in ((kernel, False), (patch_kernel, True)) if k is not None
           for fam in k.families(isa) if forced in ("auto", fam)]
    if forced in ("lut", "lut64"):  # the direct convolution is what a forced lookup-table family means
        out = [c for c in out if not c[2]]
    return out or [(kernel, "popcount", False)]  # lut forced where there is none: as family() does


def _settled_direct(choices, groups: int, qz: "_Quantized") -> bool:
    """The first run of this shape settled the layer on a direct convolution (not packed patches,
    not the depthwise kernel) and its quantizer is static: the bound call and chains run it."""
    return groups != _DEPTHWISE and len(choices) == 1 and not choices[0][2] and not qz.spec.dynamic


MEASURE_RUNS = 3  # per candidate, interleaved; the minimum is kept
# A direct convolution's measured time counts this much when it would run in a chain: the layer
# then costs no Python call and shares its input's packing, which the one-layer timing does not
# see. Without it, SqueezeNet's fire4-expand3x3 (32 channels, direct and patches within a few %
# alone) went to packed patches on some 2-thread first runs and its chain broke (+0.2 ms).
CHAIN_CREDIT = 0.85


def fastest_way(times: list[float], choices: list[tuple[Any, str, bool]], chainable: bool) -> int:
    """Index of the way to keep from the measured times of `choices` (kernel, family, patches?):
    the fastest, a direct convolution's time counted at CHAIN_CREDIT when it could join a chain."""
    return int(np.argmin([t if patch or not chainable else t * CHAIN_CREDIT for t, (_, _, patch) in zip(times, choices)]))


def dynamic_qparams(x: np.ndarray, bits: int) -> tuple[float, int]:
    """Run-time min/max step and zero point, computed exactly as the BinQuantizeDynamic body."""
    f32 = np.float32
    qmax = f32((1 << bits) - 1)
    if x.size == 0:
        raise ModelError("a quantizer got an empty tensor")
    lo, hi = f32(x.min()), f32(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN / Inf inside the network: range of the finite part
        fin = x[np.isfinite(x)]
        lo, hi = (f32(fin.min()), f32(fin.max())) if fin.size else (f32(0), f32(0))
    lo = min(lo, f32(0))
    hi = max(hi, f32(0))
    with np.errstate(over="ignore", invalid="ignore"):
        scale = f32(max(f32(hi - lo), f32(1e-8)) / qmax)
    if not np.isfinite(scale):
        raise ModelError(f"activation range {float(lo):g}..{float(hi):g} overflows float32 in a quantizer")
    zp = int(np.clip(np.round(f32(-lo) / scale), 0, qmax))
    return float(scale), zp


class Model:
    """An ONNX model (decomposed or not) ready to run on a batch of images."""

    def __init__(self, path: str | Path, backend: str = "native", threads: int | None = None,
                 isa: str | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.path = Path(path)
        self.model = read_model(self.path)
        self.backend, self.threads, self.isa = backend, threads, isa
        self.input_name, self.input_shape = model_input(self.model)
        self.input_dtype = input_dtype(self.model)
        self.batch = fixed_batch(self.model)  # B > 1 fixed in the graph: inputs run in chunks of B
        self.output_names = [o.name for o in self.model.graph.output]
        self.metadata = {p.key[len(META_PREFIX):]: p.value for p in self.model.metadata_props
                         if p.key.startswith(META_PREFIX)}
        self.decomposed = any(n.domain == ops.DOMAIN for n in self.model.graph.node)
        if self.decomposed:
            have = {f.name for f in self.model.functions if f.domain == ops.DOMAIN}
            used = {n.op_type for n in self.model.graph.node if n.domain == ops.DOMAIN}
            if used - have:
                raise DecomposedModelError(f"{path}: decomposed ops without a function body: "
                                           f"{', '.join(sorted(map(str, used - have)))}")
        self._steps: list[Step] | None = None
        # runs of native steps as one C call each, per (input shape, kernel environment); False
        # runs every step from Python (what per-layer timing and recording hooks need)
        self.chains = True
        self._chains: dict[tuple, dict[int, chains.ChainRun]] = {}
        self._whole: ort.InferenceSession | None = None
        if backend == "native" and self.decomposed:
            try:
                self._prepare_native()
            except DecomposedModelError as e:  # name the file: infer may be given several
                raise DecomposedModelError(f"{self.path}: {e}") from None
        else:
            self._whole = _session(self.model, threads)

    # ------------------------------------------------------------------------------------ native
    def _prepare_native(self) -> None:
        from bdecomp import native

        self._steps = build_schedule(self.model)
        types = _tensor_types(self.model)
        inits = {t.name: t for t in self.model.graph.initializer}
        opsets = [o for o in self.model.opset_import if o.domain != ops.DOMAIN]
        needed_later = self._needed_after = _needed_after(self._steps, self.output_names)
        for i, step in enumerate(self._steps):
            if step.kind == "ort":
                produced = {o for n in step.nodes for o in n.output}
                used = {x for n in step.nodes for x in all_inputs(n)}
                step.inputs = sorted(x for x in used if x and x not in produced and x not in inits)
                step.outputs = [o for n in step.nodes for o in n.output if o in needed_later[i]]
                sub = helper.make_graph(
                    step.nodes, f"segment{i}", [_boundary(x, types) for x in step.inputs],
                    [_boundary(x, types) for x in step.outputs], [inits[x] for x in sorted(used) if x in inits])
                m = helper.make_model(sub, opset_imports=opsets, ir_version=self.model.ir_version)
                # segments of cheap ops (Add, Relu, pools, Concat) run inline: waking onnxruntime's
                # workers costs more than they save (ResNet-56's 27 residual segments: 0.80 ms on
                # one thread, 1.24 ms on two). Segments with a convolution (a layer left float)
                # let the workers spin during the run, as onnxruntime does, and stop when it
                # returns: ResNet-56 `--budget 12 --float-when-faster` at 2 threads 1.97 → 1.58 ms
                # (segments of several convolutions); SqueezeNet `--budget 16`, whose expand1x1
                # layers stay float one per segment, 6.8-7.2 → 6.5-6.7 ms (Intel Xeon, 2 threads)
                heavy = any(n.op_type in HEAVY_OPS for n in step.nodes)
                step.session = (_session(m, self.threads if heavy else 1)
                                if step.outputs else None)
            elif step.kind == "quant":
                step.packers = {}  # bound quantize_pack calls (see _Quantized)
            elif step.kind == "layer":
                spec: LayerSpec = step.spec
                q = self._quant_spec(spec.quant)
                kernel = spec.weight_shape[2:] if spec.op == ops.CONV else (1, 1)
                cin = spec.weight_shape[1] * spec.group if spec.op == ops.CONV else spec.depth
                common = dict(bits=q.bits, zero_point=q.zero_point or 0, scale=spec.scale or q.scale or 1.0,
                              act_min=spec.act_min, act_max=spec.act_max)
                depthwise = spec.op == ops.CONV and spec.group == cin == spec.basis.shape[0] > 1
                try:
                    step.kernel = (native.DepthwiseConv if depthwise else native.PackedConv)(
                        spec.basis, spec.coeffs, spec.bias, cin=cin, groups=spec.group, kernel=kernel,
                        strides=spec.strides, pads=spec.pads, dilations=spec.dilations, **common)
                    step.patch_kernel = (native.PackedConv(spec.basis, spec.coeffs, spec.bias, cin=spec.depth,
                                                           groups=1, kernel=(1, 1), **common)
                                         if use_im2col(spec) and not depthwise else None)
                    step.plans, step.bound = {}, {}
                except ValueError as e:
                    raise DecomposedModelError(f"malformed decomposed node {spec.name!r}: {e}") from None

    def _quant_spec(self, name: str) -> QuantSpec:
        for s in self._steps:
            if s.kind == "quant" and s.spec.name == name:
                return s.spec
        raise DecomposedModelError(f"quantizer {name!r} not found")

    def _run_native(self, x: np.ndarray) -> list[np.ndarray]:
        env: dict[str, Any] = {self.input_name: x}
        quantized: dict[str, _Quantized] = {}
        envk = _native()._env_state()  # BDECOMP_ISA / KERNEL / THREADS: part of every bound call's key
        ckey = (x.shape, envk)
        compiled = self._chains.get(ckey) if self.chains else None
        i, steps, arenas = 0, self._steps, []
        while i < len(steps):
            run = compiled.get(i) if compiled else None
            if run is not None:
                try:
                    done = run.run(env, arenas)
                except ValueError as e:  # the C checks; the chain was built from a run that passed them
                    raise ModelError(f"native chain failed: {_first_line(e)}") from None
                if done:
                    i = run.end
                    continue
            self._run_step(steps[i], env, quantized, envk)
            i += 1
        if self.chains and compiled is None:
            if len(self._chains) >= 16:
                self._chains.clear()
            self._chains[ckey] = self._build_chains(env)
        outs = [_materialize(env[o], quantized) for o in self.output_names]
        if arenas:  # outputs must not alias an arena a later run reuses
            outs = [o.copy() if any(np.may_share_memory(o, a) for _, a in arenas) else o for o in outs]
            for chain, arena in arenas:
                chain.release(arena)
        return outs

    def _run_step(self, step: Step, env: dict[str, Any], quantized: dict[str, _Quantized], envk: tuple) -> None:
        if step.kind == "ort":
            if step.session is None:
                return
            feeds = {name: _materialize(env[name], quantized) for name in step.inputs}
            try:
                env.update(zip(step.outputs, step.session.run(step.outputs, feeds)))
            except Exception as e:  # onnxruntime raises its own exception types
                raise ModelError(f"onnxruntime failed: {_first_line(e)}") from None
        elif step.kind == "quant":
            spec: QuantSpec = step.spec
            xin = np.ascontiguousarray(env[spec.input], dtype=np.float32)
            scale, zp = dynamic_qparams(xin, spec.bits) if spec.dynamic else (spec.scale, spec.zero_point)
            qz = _Quantized(xin, spec, scale, zp, self.threads, None if spec.dynamic else step.packers)
            quantized[spec.outputs[0]] = qz
            env[spec.outputs[0]] = qz
            if spec.dynamic:
                env[spec.outputs[1]] = np.array(scale, np.float32)
                env[spec.outputs[2]] = np.array(zp, np.uint8)
        elif step.kind == "concat":
            parts = [np.asarray(_materialize(env[x], quantized)) for x in step.inputs]
            if any(p.ndim < 2 or p.shape[:1] + p.shape[2:] != parts[0].shape[:1] + parts[0].shape[2:] for p in parts):
                raise ModelError(f"Concat {step.spec.name!r}: parts of shapes {[list(p.shape) for p in parts]} "
                                 "do not concatenate along axis 1")
            env[step.spec.output] = np.concatenate(parts, axis=1)
        else:
            env[step.spec.output] = self._run_layer(step, env, envk)

    def _build_chains(self, env: dict[str, Any]) -> dict[int, chains.ChainRun]:
        """The chains (runtime/chains.py) of this input shape, from the tensors of a completed run:
        by first step."""
        native = _native()
        elig = chains.eligible_steps(self._steps, env, self._chain_way)
        out = {}
        for span in chains.chain_spans(self._steps, elig, self._needed_after):
            out[span[0]] = chains.build(self._steps, span, env, self._needed_after, self._chain_way, native.Chain,
                                        self.isa, self.threads)
        return out

    def _chain_way(self, step: Step, env: dict[str, Any]):
        """(kernel, family, (n, h, w), groups, channel axis, output shape) of a layer that can run in
        a chain with this env's input, else None (see runtime/chains.py)."""
        qz = env.get(step.inputs[0])
        if not isinstance(qz, _Quantized):
            return None
        plan = step.plans.get(qz.x.shape)
        if plan is None:
            return None
        choices, args, groups, axis, _, shapes = plan
        if not _settled_direct(choices, groups, qz):
            return None
        if step.spec.residual is not None and not self._residual(step.spec, env, shapes)[1]:
            return None
        kernel, family, _ = choices[0]
        return kernel, family, args, groups, axis, shapes[0]

    def _run_layer(self, step: Step, env: dict[str, Any], envk: tuple | None = None) -> np.ndarray:
        """One native layer step; envk: the kernels' environment (BDECOMP_*), read once per run."""
        if envk is None:
            envk = _native()._env_state()
        try:
            return self._run_layer_checked(step, env, envk)
        except ValueError as e:  # the native layer's own argument checks (sizes, geometry)
            raise ModelError(f"layer {step.spec.name}: {_first_line(e)}") from None

    def _run_layer_checked(self, step: Step, env: dict[str, Any], envk: tuple) -> np.ndarray:
        spec: LayerSpec = step.spec
        qz: _Quantized = env[step.inputs[0]]
        xin = qz.x
        # per input shape: the checks and the path decision, once (the kernels re-check sizes)
        plan = step.plans.get(xin.shape)
        if plan is None:
            plan = self._layer_plan(step, xin)
            if len(step.plans) >= 16:
                step.plans.clear()
            step.plans[xin.shape] = plan
        choices, args, groups, axis, oshape, shapes = plan
        scale = spec.scale or qz.scale  # the layer's own step (weights carrying per-channel steps) or its quantizer's
        res, clamp = self._residual(spec, env, shapes)
        if groups == _DEPTHWISE:
            y = choices[0][0].run_codes(qz.native_codes(), threads=self.threads, scale=scale,
                                        zero_point=qz.zero_point, residual=res, clamp=clamp)
        elif _settled_direct(choices, groups, qz):
            # the settled way to run this shape, bound once (a static quantizer: fixed scale)
            bkey = (xin.shape, envk)
            f = step.bound.get(bkey)
            if f is None:
                if len(step.bound) >= 16:
                    step.bound.clear()
                kernel, family, _ = choices[0]
                f = step.bound[bkey] = kernel.bind(*args, isa=self.isa, threads=self.threads, scale=scale,
                                                   zero_point=qz.zero_point, family=family)
            y = f(qz.packed(groups, axis, envk), res, clamp)
        else:
            def run(choice):
                kernel, family, patch = choice
                if patch:
                    act, n, oh, ow = qz.packed_im2col(spec)
                    return kernel.run(act, n, oh, ow, isa=self.isa, threads=self.threads, scale=scale,
                                      zero_point=qz.zero_point, family=family, residual=res, clamp=clamp)
                return kernel.run(qz.packed(groups, axis, envk), *args, isa=self.isa, threads=self.threads,
                                  scale=scale, zero_point=qz.zero_point, family=family, residual=res, clamp=clamp)

            if len(choices) > 1:  # first input of this shape: time every way, keep the fastest
                best = [float("inf")] * len(choices)
                for _ in range(MEASURE_RUNS):  # interleaved, so a slow moment does not hit one way only
                    for i, c in enumerate(choices):
                        if c[2]:  # the patches are this layer's own: their packing counts
                            qz.forget_im2col(spec)
                        t0 = time.perf_counter()
                        y = run(c)
                        best[i] = min(best[i], time.perf_counter() - t0)
                choices[:] = [choices[fastest_way(best, choices, self.chains and not qz.spec.dynamic)]]
            else:  # packed patches, or a dynamic quantizer (a new scale every run)
                y = run(choices[0])
        y = y if oshape is None else y.reshape(oshape)
        return y if clamp else self._add_clamp(y, env[spec.residual], spec)

    @staticmethod
    def _residual(spec: LayerSpec, env: dict[str, Any], shapes) -> tuple[np.ndarray | None, bool]:
        """(residual for the kernel or None, clamp in the kernel?) for a layer with a fused Add: a
        float32 tensor of the output's shape goes to C; anything else (a broadcasting operand)
        is added afterwards by _add_clamp, so the clamp must wait for it."""
        if spec.residual is None:
            return None, True
        r = env[spec.residual]
        out_shape, c_shape = shapes
        if isinstance(r, np.ndarray) and r.dtype == np.float32 and r.shape == out_shape:
            return np.ascontiguousarray(r).reshape(c_shape), True
        return None, False

    @staticmethod
    def _add_clamp(y: np.ndarray, r: Any, spec: LayerSpec) -> np.ndarray:
        """The fused Add with onnxruntime's broadcasting, then the clamp (the C comparisons)."""
        try:
            y = np.add(y, np.asarray(r, dtype=np.float32), dtype=np.float32)
        except ValueError:
            raise ModelError(f"layer {spec.name}: cannot add a residual of shape {list(np.shape(r))} to an "
                             f"output of shape {list(y.shape)}") from None
        return np.minimum(np.maximum(y, np.float32(spec.act_min)), np.float32(spec.act_max))

    def _layer_plan(self, step: Step, xin: np.ndarray):
        """([(kernel, family, im2col?) candidates], (n, h, w), groups, channel axis, output reshape,
        (output shape, the C kernel's output shape)) for one input shape; the first run keeps the
        fastest candidate."""
        spec: LayerSpec = step.spec
        if spec.op == ops.CONV:
            if xin.ndim != 4 or xin.shape[1] != step.kernel.cin:
                raise ModelError(f"layer {spec.name}: input of shape {list(xin.shape)}, expected "
                                 f"[N, {step.kernel.cin}, H, W]")
            n, _, h, w = xin.shape
            out = step.kernel.output_shape(n, h, w)
            _check_output_size(spec, out)
            from bdecomp import native

            if isinstance(step.kernel, native.DepthwiseConv):
                return [(step.kernel, "depthwise", False)], (n, h, w), _DEPTHWISE, 1, None, (out, out)
            patch = step.patch_kernel if im2col_bytes(xin, step) <= IM2COL_MAX_BYTES else None
            return kernel_choices(step.kernel, patch, self.isa), (n, h, w), spec.group, 1, None, (out, out)
        if xin.ndim < 2 or xin.shape[-1] != spec.depth:
            raise ModelError(f"layer {spec.name}: input of shape {list(xin.shape)}, expected [..., {spec.depth}]")
        rows, cout = int(np.prod(xin.shape[:-1])), spec.basis.shape[0]
        _check_output_size(spec, (rows, cout))
        oshape = (*xin.shape[:-1], cout)
        return (kernel_choices(step.kernel, None, self.isa), (rows, 1, 1), 1, -1, oshape,
                (oshape, (rows, cout, 1, 1)))

    # ------------------------------------------------------------------------------------ public
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs (in graph order) for input x (float32, NCHW, batch any size the model allows;
        cast to a float16 or double model's input type)."""
        return run_batched(self._run_one, self._check_input(x), self.batch)

    def _run_one(self, x: np.ndarray) -> list[np.ndarray]:
        if self._whole is not None:
            try:
                return self._whole.run(None, {self.input_name: x})
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"onnxruntime failed: {msg[:300]}") from None
        return self._run_native(x)

    def _check_input(self, x) -> np.ndarray:
        """C-contiguous input (float32, or the model's float type) of the model's rank and channel count, non-empty, finite."""
        try:
            x = np.ascontiguousarray(x, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as e:
            raise ModelError(f"input is not a float array: {_first_line(e)}") from None
        shape = self.input_shape
        if shape and x.ndim != len(shape):
            raise ModelError(f"input of shape {list(x.shape)}, the model expects rank {len(shape)} "
                             f"({['?' if d is None else d for d in shape]})")
        if x.size == 0:
            raise ModelError(f"input of shape {list(x.shape)} is empty")
        if shape and len(shape) > 1 and shape[1] and x.shape[1] != shape[1]:
            raise ModelError(f"input has {x.shape[1]} channels, the model expects {shape[1]}")
        if not np.all(np.isfinite(x)):
            raise ModelError("input contains NaN or Inf")
        if self.input_dtype != "float32":
            x = x.astype(self.input_dtype)
            if not np.all(np.isfinite(x)):
                raise ModelError(f"input overflows the model's {self.input_dtype} input")
        return x

    def layer_names(self) -> list[str]:
        return [s.spec.name for s in self._steps or [] if s.kind == "layer"]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _check_output_size(spec: LayerSpec, shape) -> None:
    n = 1
    for d in shape:
        n *= int(d)
    if n > MAX_OUTPUT_ELEMS:
        raise ModelError(f"layer {spec.name}: output of shape {list(shape)} ({n:,} elements) exceeds the limit "
                         f"{MAX_OUTPUT_ELEMS:,}")


def im2col_bytes(x: np.ndarray, step: Step) -> int:
    n, _, oh, ow = step.kernel.output_shape(x.shape[0], x.shape[2], x.shape[3])
    return 4 * n * step.spec.depth * oh * ow


def _materialize(v: Any, quantized: dict[str, _Quantized]) -> np.ndarray:
    return v.codes() if isinstance(v, _Quantized) else v


def _needed_after(steps: list[Step], graph_outputs: list[str]) -> list[set[str]]:
    """For each step, the tensor names read by later steps or returned by the graph."""
    needed: set[str] = set(graph_outputs)
    out: list[set[str]] = [set() for _ in steps]
    for i in range(len(steps) - 1, -1, -1):
        out[i] = set(needed)
        s = steps[i]
        if s.kind == "ort":
            needed |= {x for n in s.nodes for x in all_inputs(n)}
        else:
            needed |= set(s.inputs)
            if s.kind == "layer":
                needed |= set(s.nodes[0].input[1:3])
    return out


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """Element type and rank (None: unknown) of every tensor, for the boundaries of onnxruntime
    segments. The rank matters: a segment whose 4-D input is declared without one runs its
    convolutions 15–20 % slower (onnxruntime's NCHWc layout rewrite needs it: SqueezeNet's first
    11 layers, 2.46 vs 2.06 ms on one thread)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.elem_type:
            types[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    return types


def _boundary(name: str, types: dict[str, tuple[int, int | None]]) -> onnx.ValueInfoProto:
    """A segment input or output: its element type (float if unknown) and rank, dimensions free."""
    elem, rank = types.get(name, (onnx.TensorProto.FLOAT, None))
    return helper.make_tensor_value_info(name, elem, None if rank is None else [None] * rank)


def load(path: str | Path, backend: str = "native", threads: int | None = None, isa: str | None = None) -> Model:
    """Load a model for inference; see Model."""
    return Model(path, backend=backend, threads=threads, isa=isa)
