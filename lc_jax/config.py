"""Configs: the tree of fields every run starts from, big_vision-style `arg` parsing, loading, and validation.

`defaults()` is that tree. The position schemes and attention variants declare their own fields
(`FIELDS` on each class) and check them (`check`); the sections written out here (model dimensions,
data, train, checkpoint, mesh, distributed, eval, aot) are the ones no single module owns.
`validate(config)` gathers those checks, the cross-cutting ones (dimensions, data, mesh) and unknown
keys, and raises one `ConfigError` naming each field, the value it got and the values it allows.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import ml_collections
from etils import epath

from lc_jax import attention, fields, layers, model, ops, positions
from lc_jax import data as data_lib
from lc_jax.data import corpus, packing, synthetic, tokenizer
from lc_jax.errors import UserError
from lc_jax.positions import rope_scaling
from lc_jax.sharding import MESH_AXES, mesh_shape
from pallas_kernels import ring_attention

EVAL_PROTOCOLS = ("chunks", "sliding")  # per-position / length evaluation: see lc_jax/evaluate.py
RETRIEVAL_TASKS = ("passkey", "kv_recall", "mqar")  # eval.retrieval.tasks: lc_jax/evaluate.py
NONFINITE_POLICIES = ("stop", "skip", "rewind")  # a step with a non-finite loss or gradient: lc_jax/train.py


class ConfigError(UserError, ValueError):
    """A config failed validation; the message lists every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + problems[0] if len(problems) == 1 else
                         "invalid config:\n  - " + "\n  - ".join(problems))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse 'key=value,flag' structural choices, typed by the defaults (big_vision's convention)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=1)
            raise ConfigError([f"config arg {key!r} is not one of {sorted(defaults)}"
                               + (f"; did you mean {near[0]!r}?" if near else "")])
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("", "1", "true", "yes")
        elif value == "":
            raise ConfigError([f"config arg {key!r} needs a value"])
        else:
            out[key] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(out)


ROOT = Path(__file__).resolve().parent.parent
"""The directory holding lc_jax/ and configs/: the checkout, or site-packages after a plain install."""


def find(path: str | Path) -> Path:
    """A repository path such as configs/quickstart.py, from any working directory: as given when it
    exists there, else under ROOT (a notebook starts in notebooks/, a script anywhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return p
    return ROOT / p


def load_module(path: str):
    """Import a config file by path (it may define get_config and get_sweep); see `find`."""
    path = str(find(path))
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Load `get_config(arg)` from a config file path (the notebook-friendly twin of --config)."""
    module = load_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def defaults() -> ml_collections.ConfigDict:
    """Every field a config may set, at its default: what `configs/base.py` starts from and what
    `validate` checks keys against (a key not in here is a misspelling, reported with the nearest one)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = dict(
        vocab_size=384,  # 259 byte-level ids, padded to a multiple of 128 for the MXU/tensor cores
        d_model=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=0,  # 0: d_model // num_heads
        mlp_dim=1536,
        max_seq_len=8192,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        remat="none",  # none | full | dots
        norm_eps=1e-6,
        # The position scheme and the attention variant, by name; each declares its own fields (FIELDS in
        # lc_jax/positions/*.py and lc_jax/attention/*.py) and every one of them is here, so that a sweep can
        # switch the name and keep the rest.
        position=dict(name="rope", **positions.fields()),
        attention=dict(name="full", **attention.fields()),
        # Per-layer pattern of layer types, each with its own attention variant and position scheme, e.g.
        # pattern='5*local,global' with types.local.attention.name='sliding' (lc_jax/layers.py; presets:
        # configs/base.py:pattern=gemma3|llama4|gpt_oss). Empty: every layer as model.attention / position.
        layers=dict(layers.FIELDS),
    )
    c.data = dict(
        source="stdlib",  # stdlib | files
        files="",  # glob of .txt/.py/... (one document per file) or .jsonl (one per line)
        jsonl_field="text",
        val_files="",  # data.source='files': a glob of validation files (then all of `files` trains)
        seq_len=2048,
        batch_size=8,  # global batch
        packing="concat",  # concat | pad
        val_fraction=0.05,
        max_docs=0,  # >0: keep only the first few documents (tests)
        # Length curriculum: 'step:seq_len,...' stages ending at data.seq_len, e.g. '0:512,300:1024,600:2048'.
        curriculum="",
        curriculum_constant_tokens=True,  # shorter stages get proportionally larger batches
        synthetic=dict(synthetic.FIELDS),  # retrieval tasks mixed into the text: see lc_jax/data/synthetic.py
    )
    c.train = dict(
        steps=10_000,
        lr=3e-4,
        min_lr_ratio=0.1,
        warmup_steps=200,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        log_every=10,
        eval_every=500,
        eval_batches=8,
        progress=True,
        # Continued training: start from another run's parameters and step (workdir path); the
        # optimizer and its schedule restart as configured here.
        init_from="",
        init_from_step=0,  # 0: its latest checkpoint
        # A step with a non-finite loss or gradient: 'stop' (keep the last checkpoint saved before it, exit 1),
        # 'skip' (drop its update; stop after `nonfinite_limit` in a row), or 'rewind' (reload the last
        # checkpoint before it, skip its batch, multiply the learning rate by `rewind_lr_scale`; stop after
        # `nonfinite_limit` rewinds).
        nonfinite="stop",
        nonfinite_limit=10,
        rewind_lr_scale=1.0,
    )
    c.checkpoint = dict(every=500, keep=3)
    # Device mesh; -1: the remaining devices. context > 1 turns attention into ring attention over that
    # axis, with tokens laid out zig-zag (balanced under the causal mask) or contiguous.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1, context_layout="zigzag")
    # Multi-host (jax.distributed): set coordinator_address ('host:port'), num_processes and process_id, or
    # export JAX_COORDINATOR_ADDRESS etc.; auto=True lets JAX detect a TPU pod slice / SLURM / Open MPI.
    # cpu_collectives: 'gloo' for multi-process CPU runs (tests).
    c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1, auto=False, cpu_collectives="")
    c.eval = dict(
        position_buckets=32,
        # How validation text is cut for the loss at each length: 'chunks' (non-overlapping, positions restart
        # at each chunk) or 'sliding' (windows every `stride` tokens, only the new targets scored, so each has at
        # least length - stride tokens of context); stride 0 means half the evaluation length.
        protocol="chunks",
        stride=0,
        # Evaluate with another RoPE scaling than training used ('' keeps the trained one);
        # factor 0 means eval_len / train_len for static methods and 1 for dynamic_ntk.
        position=dict(scaling="", factor=0.0),
        # Extrapolation sweep (python -m lc_jax.evaluate): lengths as multiples of data.seq_len,
        # the RoPE scalings to compare, and a token budget per length.
        length_multipliers=(1, 2, 4, 8),
        scalings=("none", "linear", "ntk", "dynamic_ntk", "yarn"),
        max_tokens=65536,
        # Retrieval (python -m lc_jax.evaluate): tasks from ('passkey', 'kv_recall', 'mqar') on the lengths
        # above x `depths` evenly spaced key depths (MQAR: x `mqar_pairs`), `samples` examples per cell.
        retrieval=dict(tasks=(), depths=5, samples=8, mqar_pairs=(4, 8, 16)),
    )
    # `python -m lc_jax.aot`: the TPU slice to compile for when --topology is not given (e.g. 'v5p:4x4x4').
    c.aot = dict(topology="")
    return c


def unknown_keys(config, schema, prefix: str = "") -> list[str]:
    """A line for each key of `config` that `schema` lacks, with the nearest valid key where one is close."""
    p = []
    for key in config.keys():
        field = f"{prefix}{key}"
        if field == "model.layers.types":  # named by the user: each type holds a partial attention / position
            p += _unknown_type_keys(config[key])
        elif key not in schema:
            near = difflib.get_close_matches(key, list(schema.keys()), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{near[0]}?" if near else f"valid keys here: {sorted(schema.keys())}"
            p.append(f"{field}: unknown key; {hint}")
        elif isinstance(schema[key], ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
            p += unknown_keys(config[key], schema[key], f"{field}.")
    return p


def _unknown_type_keys(types) -> list[str]:
    schema = defaults().model
    p = []
    for name, spec in types.items():
        where = f"model.layers.types.{name}"
        if not isinstance(spec, ml_collections.ConfigDict):
            p.append(f"{where}={spec!r}: must be a dict with 'attention' and/or 'position'")
            continue
        p += unknown_keys(spec, ml_collections.ConfigDict(dict(attention=schema.attention, position=schema.position)),
                          f"{where}.")
    return p


def head_dim(m) -> int:
    return m.head_dim or m.d_model // m.num_heads


def _allowed(problems: list[str], field: str, value, values) -> None:
    problems += fields.allowed(field, value, values)


def _positive(problems: list[str], field: str, value, **kw) -> bool:
    bad = fields.positive(field, value, **kw)
    problems += bad
    return not bad


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill the values that default to other fields (RoPE original length: the training length)."""
    sc = config.model.position.scaling
    if not sc.original_max_len and sc.name != "llama3":
        sc.original_max_len = config.data.seq_len
    return config


def upgrade_saved(d: dict) -> dict:
    """A run directory's config.json written by an earlier version, in today's fields.

    Such a run trained with YaRN's ratio ramp (fields alpha / beta) and the RMSNorm
    indexer key, so it is mapped to `yarn_ratio_ramp` and `index_norm='rmsnorm'`:
    its checkpoint restores and evaluates as it trained. Training fields added since take their defaults.
    Current configs pass unchanged.
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
    model.setdefault("layers", dict(layers.FIELDS))  # runs from before per-layer patterns: one layer type
    for section in ("position", "attention"):  # fields added since (sink_tokens, temperature tuning): defaults
        if section in model:
            for key, value in defaults().model[section].to_dict().items():
                model[section].setdefault(key, value)
    if "train" in d:  # runs from before the non-finite policies stopped at the first non-finite step
        for key in ("nonfinite", "nonfinite_limit", "rewind_lr_scale"):
            d["train"].setdefault(key, defaults().train[key])
    return d


def _layer_types(m) -> list:
    """The resolved layer types, or none while the pattern itself is invalid (reported by layers.check)."""
    try:
        return list(layers.resolve(m).values())
    except ValueError:
        return []


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
    for name in dict.fromkeys(t.attention.name for t in _layer_types(m)):  # in layer order: stable messages
        variant = attention.REGISTRY.get(name)
        if ctx > 1 and variant is not None and not variant.RING:
            p.append(f"model.attention.name={name!r} does not run under context parallelism yet "
                     f"(mesh.context={ctx}): use mesh.context=1")
    if ctx > 1 and ops.check_impl(m.attention.impl) is None and not ops.can_ring(m.attention.impl):
        ring = [n for n in ops.IMPLS if ops.can_ring(n)]
        p.append(f"model.attention.impl={m.attention.impl!r} cannot run inside ring attention (mesh.context={ctx}): "
                 f"allowed values are {ring}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             vmem_bytes: int | None = None) -> None:
    """Raise ConfigError listing every invalid field; return None if the config is usable.

    `num_devices` checks the mesh against them; `vmem_bytes` (the VMEM of the TPU the run compiles for)
    checks that the Pallas TPU kernels' block sizes fit it, which Mosaic would otherwise refuse mid-trace.
    """
    p: list[str] = unknown_keys(config, defaults())
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

    # --- the position scheme and the attention variant check their own fields
    hd = head_dim(m) if heads_ok and not (m.head_dim == 0 and m.d_model % m.num_heads) else None
    p += positions.check(pos, head_dim=hd)
    ev = config.eval.position
    if ev.scaling and pos.name in positions.REGISTRY:
        p += positions.REGISTRY[pos.name].check_extension(pos, ev.scaling, ev.factor, field="eval.position.scaling",
                                                          factor_field="eval.position.factor", head_dim=hd)
    itemsize = jnp.dtype(model.DTYPES[m.dtype]).itemsize if m.dtype in model.DTYPES else None
    p += attention.check(m.attention, head_dim=hd, itemsize=itemsize, vmem_bytes=vmem_bytes)
    p += layers.check(m, head_dim=hd, itemsize=itemsize, vmem_bytes=vmem_bytes)  # each layer type's own

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
    if t.init_from and not (epath.Path(t.init_from) / "config.json").exists():
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
    _allowed(p, "train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    _positive(p, "train.nonfinite_limit", t.nonfinite_limit)
    if not isinstance(t.rewind_lr_scale, (int, float)) or not 0 < t.rewind_lr_scale <= 1:
        p.append(f"train.rewind_lr_scale={t.rewind_lr_scale!r}: must be in (0, 1]")
    _positive(p, "checkpoint.every", config.checkpoint.every)
    _positive(p, "checkpoint.keep", config.checkpoint.keep)
    _positive(p, "eval.position_buckets", config.eval.position_buckets)
    ev_cfg = config.eval
    _allowed(p, "eval.protocol", ev_cfg.get("protocol", "chunks"), EVAL_PROTOCOLS)
    mults = ev_cfg.length_multipliers
    mults_ok = (isinstance(mults, (tuple, list)) and len(mults) > 0
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in mults))
    if not mults_ok:
        p.append(f"eval.length_multipliers={mults!r}: must be a non-empty tuple of positive numbers (multiples of "
                 "data.seq_len), e.g. (1, 2, 4)")
    for name in ev_cfg.scalings:
        _allowed(p, "eval.scalings", name, rope_scaling.SCALINGS)
    _positive(p, "eval.max_tokens", ev_cfg.max_tokens)
    r = ev_cfg.get("retrieval", {})
    for task in r.get("tasks", ()):
        _allowed(p, "eval.retrieval.tasks", task, RETRIEVAL_TASKS)
    for f in ("depths", "samples"):
        _positive(p, f"eval.retrieval.{f}", r.get(f, 1))
    for n in r.get("mqar_pairs", ()):
        _positive(p, "eval.retrieval.mqar_pairs", n)
    stride = ev_cfg.get("stride", 0)
    _positive(p, "eval.stride", stride, zero_ok=True)
    if isinstance(stride, int) and stride > 0 and isinstance(d.seq_len, int) and mults_ok:
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
            sizes = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
        except ValueError as e:
            p.append(str(e))
        else:
            _check_mesh(p, config, sizes)
    if p:
        raise ConfigError(p)
