"""Config helpers: big_vision-style `arg` parsing, loading, and validation before anything compiles.

`validate(config)` collects *every* bad field and raises one `ConfigError`
naming each field, the value it got and the values it allows.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax.numpy as jnp
import ml_collections

from lc_jax import attention, model, ops, positions
from lc_jax import data as data_lib
from lc_jax.attention import dsa
from lc_jax.data import corpus, packing, tokenizer
from lc_jax.positions import rope_scaling
from lc_jax.positions.rope import FRACTION_MODES, LAYOUTS, rotary_dim
from pallas_kernels import ring_attention
from pallas_kernels.flash_attention import tpu as flash_tpu

MESH_AXES = ("data", "fsdp", "tensor", "context")
EVAL_PROTOCOLS = ("chunks", "sliding")  # per-position / length evaluation: see lc_jax/evaluate.py


class ConfigError(ValueError):
    """A config failed validation; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse 'key=value,flag' structural choices, typed by the defaults (big_vision's convention)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ConfigError([f"config arg {key!r} is not one of {sorted(defaults)}"])
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("", "1", "true", "yes")
        elif value == "":
            raise ConfigError([f"config arg {key!r} needs a value"])
        else:
            out[key] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(out)


def load_module(path: str):
    """Import a config file by path (it may define get_config and get_sweep)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Load `get_config(arg)` from a config file path (the notebook-friendly twin of --config)."""
    module = load_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def head_dim(m) -> int:
    return m.head_dim or m.d_model // m.num_heads


def _allowed(problems, field, value, allowed):
    if value not in allowed:
        problems.append(f"{field}={value!r}: allowed values are {list(allowed)}")


def _positive(problems, field, value, *, zero_ok=False, kind=(int,)):
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        what = "a non-negative" if zero_ok else "a positive"
        problems.append(f"{field}={value!r}: must be {what} {'/'.join(k.__name__ for k in kind)}")
    return ok


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolve -1 ('the rest') and check the product against the device count."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError([f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}"])
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ConfigError([f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices"])
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError([f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                           f"but {num_devices} are present"])
    return tuple(sizes)


def _check_scaling(p, field, factor_field, name, factor, m, pos):
    _allowed(p, field, name, rope_scaling.SCALINGS)
    if name != "none" and pos.name != "rope":
        p.append(f"{field}={name!r} needs model.position.name='rope' (got {pos.name!r}); "
                 "scalings stretch RoPE frequencies")
    if not (isinstance(factor, (int, float)) and (factor == 0 or factor >= 1)):
        p.append(f"{factor_field}={factor!r}: must be >= 1 (0: the method's default)")
    sc = pos.scaling
    if name in ("yarn", "yarn_ratio_ramp") and not 0 < sc.beta_slow < sc.beta_fast:
        p.append(f"model.position.scaling.beta_slow={sc.beta_slow}, beta_fast={sc.beta_fast}: "
                 "need 0 < beta_slow < beta_fast (rotations over the original context; reference 1 and 32)")
    for f in ("mscale", "mscale_all_dim", "attention_factor"):
        if not (isinstance(sc[f], (int, float)) and sc[f] >= 0):
            p.append(f"model.position.scaling.{f}={sc[f]!r}: must be a number >= 0 (0: unset)")
    if name == "llama3" and not sc.low_freq_factor < sc.high_freq_factor:
        p.append(f"model.position.scaling.low_freq_factor={sc.low_freq_factor} must be < "
                 f"high_freq_factor={sc.high_freq_factor}")
    if name in ("ntk", "dynamic_ntk") and isinstance(pos.fraction, (int, float)):
        try:
            if rotary_dim(head_dim(m), pos.fraction, pos.fraction_mode) <= 2:
                p.append(f"{field}={name!r} needs a rotated width > 2 (the exponent is d / (d - 2))")
        except (TypeError, ZeroDivisionError):
            pass


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill the values that default to other fields (RoPE original length: the training length)."""
    sc = config.model.position.scaling
    if not sc.original_max_len and sc.name != "llama3":
        sc.original_max_len = config.data.seq_len
    return config


def upgrade_saved(d: dict) -> dict:
    """A run directory's config.json written before the reference-matching change, in today's fields.

    Such a run trained with YaRN's ratio ramp (fields alpha / beta) and the RMSNorm
    indexer key, so it is mapped to `yarn_ratio_ramp` and `index_norm='rmsnorm'`:
    its checkpoint restores and evaluates as it trained. Current configs pass unchanged.
    """
    model = d.get("model", {})
    sc = model.get("position", {}).get("scaling")
    if sc is not None and "alpha" in sc and "beta_fast" not in sc:
        sc["beta_slow"], sc["beta_fast"] = sc.pop("alpha"), sc.pop("beta")
        if sc.get("name") == "yarn":
            sc["name"] = "yarn_ratio_ramp"
        for key, value in rope_scaling.FIELD_DEFAULTS.items():
            sc.setdefault(key, value)
    ds = model.get("attention", {}).get("dsa")
    if ds is not None and "index_norm" not in ds:
        ds["index_norm"] = "rmsnorm"
    return d


def _check_dsa(p: list[str], ds) -> None:
    for f in ("topk", "index_heads", "index_dim", "index_block_q", "index_block_k"):
        _positive(p, f"model.attention.dsa.{f}", ds[f])
    _positive(p, "model.attention.dsa.warmup_steps", ds.warmup_steps, zero_ok=True)
    if _positive(p, "model.attention.dsa.index_rope_dim", ds.index_rope_dim, zero_ok=True):
        if ds.index_rope_dim % 2 or (isinstance(ds.index_dim, int) and ds.index_rope_dim > ds.index_dim):
            p.append(f"model.attention.dsa.index_rope_dim={ds.index_rope_dim}: must be even and "
                     f"<= model.attention.dsa.index_dim={ds.index_dim}")
    _allowed(p, "model.attention.dsa.warmup_mode", ds.warmup_mode, dsa.WARMUP_MODES)
    _allowed(p, "model.attention.dsa.index_norm", ds.get("index_norm", "layernorm"), dsa.INDEX_NORMS)
    _allowed(p, "model.attention.dsa.select", ds.get("select", "auto"), dsa.SELECT_IMPLS)
    for f in ("kl_weight", "lr", "weight_decay"):
        _positive(p, f"model.attention.dsa.{f}", ds[f], zero_ok=True, kind=(float, int))


def _check_mesh(p: list[str], config, sizes: dict[str, int]) -> None:
    """Batch, heads and sequence must split evenly over the mesh axes the sharding rules put them on."""
    m, d = config.model, config.data
    batch_shards, ctx, tp = sizes["data"] * sizes["fsdp"], sizes["context"], sizes["tensor"]
    stages = [(0, d.seq_len, d.batch_size)]
    if d.curriculum and not any(x.startswith("data.curriculum") for x in p):
        stages = data_lib.curriculum(d)
    for _, length, batch in stages:
        where = f"data.curriculum stage seq_len={length}" if d.curriculum else f"data.seq_len={length}"
        if isinstance(batch, int) and batch % batch_shards:
            what = f"{where} has batch {batch}" if d.curriculum else f"data.batch_size={batch}"
            p.append(f"{what}, not divisible by mesh data x fsdp = {batch_shards}")
        if ctx > 1 and isinstance(length, int):
            try:
                ring_attention.check_layout(length, ctx, config.mesh.context_layout)
            except ValueError as e:
                p.append(f"{where}: {e}; allowed lengths are multiples of "
                         f"{ctx * (2 if config.mesh.context_layout == 'zigzag' else 1)}")
    for f in ("num_heads", "num_kv_heads"):
        if isinstance(m[f], int) and m[f] % tp:
            p.append(f"model.{f}={m[f]} is not divisible by mesh.tensor={tp} (heads are split over it)")
    if ctx > 1 and m.attention.name == "dsa":
        p.append(f"model.attention.name='dsa' does not run under context parallelism yet (mesh.context={ctx}): "
                 "use mesh.context=1")
    if ctx > 1 and m.attention.impl not in ("auto", "xla", "pallas"):
        p.append(f"model.attention.impl={m.attention.impl!r} cannot run inside ring attention (mesh.context={ctx}): "
                 "allowed values are ['auto', 'xla', 'pallas']")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             vmem_bytes: int | None = None) -> None:
    """Raise ConfigError listing every invalid field; return None if the config is usable.

    `num_devices` checks the mesh against them; `vmem_bytes` (the VMEM of the TPU the run compiles for)
    checks that the Pallas TPU kernels' block sizes fit it, which Mosaic would otherwise refuse mid-trace.
    """
    p: list[str] = []
    m, d, t = config.model, config.data, config.train
    pos = m.position

    # --- model
    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len"):
        _positive(p, f"model.{f}", m[f])
    _positive(p, "model.head_dim", m.head_dim, zero_ok=True)
    if isinstance(m.vocab_size, int) and m.vocab_size < tokenizer.VOCAB_SIZE:
        p.append(f"model.vocab_size={m.vocab_size}: must be >= {tokenizer.VOCAB_SIZE} (256 bytes + PAD/BOS/EOS)")
    heads_ok = all(isinstance(m[f], int) and m[f] > 0 for f in ("num_heads", "num_kv_heads", "d_model"))
    if heads_ok and m.num_heads % m.num_kv_heads:
        divisors = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
        p.append(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}: "
                 f"allowed num_kv_heads are the divisors {divisors}")
    if heads_ok and not m.head_dim and m.d_model % m.num_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                 "set model.head_dim explicitly")
    _allowed(p, "model.dtype", m.dtype, model.DTYPES)
    _allowed(p, "model.param_dtype", m.param_dtype, model.DTYPES)
    _allowed(p, "model.remat", m.remat, model.REMAT_POLICIES)
    if not (isinstance(m.norm_eps, float) and m.norm_eps > 0):
        p.append(f"model.norm_eps={m.norm_eps!r}: must be a positive float")

    # --- position scheme
    pos = m.position
    _allowed(p, "model.position.name", pos.name, positions.REGISTRY)
    if pos.name == "rope":
        if not (isinstance(pos.theta, (int, float)) and pos.theta > 1):
            p.append(f"model.position.theta={pos.theta!r}: must be a number > 1")
        _allowed(p, "model.position.layout", pos.layout, LAYOUTS)
        if not (isinstance(pos.fraction, (int, float)) and 0 < pos.fraction <= 1):
            p.append(f"model.position.fraction={pos.fraction!r}: must be in (0, 1]")
        elif heads_ok and head_dim(m) % 2 == 0 and int(head_dim(m) * pos.fraction) < 2:
            p.append(f"model.position.fraction={pos.fraction}: rotates fewer than 2 of {head_dim(m)} dims")
        if heads_ok and head_dim(m) % 2:
            p.append(f"head_dim={head_dim(m)} must be even for model.position.name='rope'")
        _allowed(p, "model.position.fraction_mode", pos.fraction_mode, FRACTION_MODES)
    _check_scaling(p, "model.position.scaling.name", "model.position.scaling.factor", pos.scaling.name,
                   pos.scaling.factor, m, pos)
    ev = config.eval.position
    if ev.scaling:
        _check_scaling(p, "eval.position.scaling", "eval.position.factor", ev.scaling, ev.factor, m, pos)

    # --- attention variant
    att = m.attention
    _allowed(p, "model.attention.name", att.name, attention.REGISTRY)
    _allowed(p, "model.attention.impl", att.impl, ops.IMPLS)
    if att.name == "sliding":
        _positive(p, "model.attention.window", att.window)
    if att.name == "dsa":
        _check_dsa(p, att.dsa)
    blocks_ok = True
    for f in ("block_q", "block_k"):
        if not _positive(p, f"model.attention.{f}", att[f]):
            blocks_ok = False
        elif (att.impl == "pallas" or (att.impl == "auto" and vmem_bytes)) and att[f] % 128:
            p.append(f"model.attention.{f}={att[f]}: the Pallas TPU kernel needs a multiple of 128")
            blocks_ok = False
    if vmem_bytes and blocks_ok and heads_ok and att.impl in ("auto", "pallas") and m.dtype in model.DTYPES:
        try:
            flash_tpu.check_vmem(att.block_q, att.block_k, head_dim(m), head_dim(m),
                                 jnp.dtype(model.DTYPES[m.dtype]).itemsize, vmem_bytes, where="model.attention.")
        except ValueError as e:
            p.append(str(e))

    # --- data
    _allowed(p, "data.source", d.source, corpus.SOURCES)
    if d.source == "files" and not d.files:
        p.append("data.files is empty: with data.source='files' give a glob of .txt/.py/.jsonl files")
    _allowed(p, "data.packing", d.packing, packing.PACKINGS)
    if _positive(p, "data.seq_len", d.seq_len) and isinstance(m.max_seq_len, int) and d.seq_len > m.max_seq_len:
        why = (" (learned position embeddings cannot represent positions >= model.max_seq_len)"
               if pos.name == "learned" else "")
        p.append(f"data.seq_len={d.seq_len} does not fit model.max_seq_len={m.max_seq_len}{why}: "
                 f"allowed seq_len is 1..{m.max_seq_len}")
    _positive(p, "data.batch_size", d.batch_size)
    p.extend(data_lib.check_config(d))  # data.synthetic
    _positive(p, "data.max_docs", d.max_docs, zero_ok=True)
    if not (isinstance(d.val_fraction, float) and 0 < d.val_fraction < 1):
        p.append(f"data.val_fraction={d.val_fraction!r}: must be a float in (0, 1)")

    if d.curriculum:
        try:
            stages = data_lib.curriculum(d)
        except ValueError as e:
            p.append(str(e))
            stages = []
        if stages:
            starts = [s0 for s0, _, _ in stages]
            if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
                p.append(f"data.curriculum={d.curriculum!r}: stage steps must start at 0 and increase")
            if stages[-1][1] != d.seq_len:
                p.append(f"data.curriculum={d.curriculum!r}: the last stage must be data.seq_len={d.seq_len}")
            for _, length, batch in stages:
                if not 0 < length <= m.max_seq_len:
                    p.append(f"data.curriculum stage seq_len={length}: allowed 1..model.max_seq_len={m.max_seq_len}")
                if batch < 1 or (d.curriculum_constant_tokens and (d.batch_size * d.seq_len) % length):
                    p.append(f"data.curriculum stage seq_len={length}: batch_size * seq_len = "
                             f"{d.batch_size * d.seq_len} tokens do not split into whole sequences of it")

    # --- train / checkpoint / eval
    if t.init_from and not (Path(t.init_from) / "config.json").exists():
        p.append(f"train.init_from={t.init_from!r}: not a run directory (no config.json there)")
    for f in ("steps", "log_every", "eval_every"):
        _positive(p, f"train.{f}", t[f])
    for f in ("warmup_steps", "eval_batches"):
        _positive(p, f"train.{f}", t[f], zero_ok=True)
    for f in ("lr", "b1", "b2", "eps"):
        _positive(p, f"train.{f}", t[f], kind=(float,))
    for f in ("weight_decay", "grad_clip", "min_lr_ratio"):
        _positive(p, f"train.{f}", t[f], zero_ok=True, kind=(float, int))
    if isinstance(t.min_lr_ratio, (int, float)) and t.min_lr_ratio > 1:
        p.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    for f in ("b1", "b2"):
        if isinstance(t[f], float) and not t[f] < 1:
            p.append(f"train.{f}={t[f]}: must be in (0, 1)")
    _positive(p, "checkpoint.every", config.checkpoint.every)
    _positive(p, "checkpoint.keep", config.checkpoint.keep)
    _positive(p, "eval.position_buckets", config.eval.position_buckets)
    ev_cfg = config.eval
    _allowed(p, "eval.protocol", ev_cfg.get("protocol", "chunks"), EVAL_PROTOCOLS)
    stride = ev_cfg.get("stride", 0)
    _positive(p, "eval.stride", stride, zero_ok=True)
    if isinstance(stride, int) and stride > 0 and isinstance(d.seq_len, int):
        shortest = min(int(x * d.seq_len) for x in ev_cfg.length_multipliers)
        if stride > shortest:
            p.append(f"eval.stride={stride}: allowed 0 (half of each evaluation length) or 1..{shortest} "
                     f"(the shortest evaluation length, min(eval.length_multipliers) x data.seq_len)")

    # --- mesh
    for a in MESH_AXES:
        if not isinstance(config.mesh[a], int):
            p.append(f"mesh.{a}={config.mesh[a]!r}: must be an int (-1 means the remaining devices)")
    _allowed(p, "mesh.context_layout", config.mesh.get("context_layout"), ring_attention.LAYOUTS)
    dist = config.get("distributed")
    if dist is not None:
        _allowed(p, "distributed.cpu_collectives", dist.cpu_collectives, ("", "gloo", "mpi"))
        _positive(p, "distributed.num_processes", dist.num_processes, zero_ok=True)
        if not isinstance(dist.coordinator_address, str):
            p.append(f"distributed.coordinator_address={dist.coordinator_address!r}: must be 'host:port' or ''")
    if num_devices is not None and not any(s.startswith("mesh.") for s in p):
        try:
            _check_mesh(p, config, dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices))))
        except ConfigError as e:
            p.extend(e.problems)
    if p:
        raise ConfigError(p)
