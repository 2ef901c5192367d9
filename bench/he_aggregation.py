"""Encrypted aggregation cost: fedcohort's CKKS path against plaintext and NVIDIA FLARE's HE path.

K silos each send P parameters (BENCHMARKS.md section 2). Three schemes, measured in one
run on the same updates (silo k: weights w_k ~ N(0, 0.5), n_k training rows):

  plaintext         the floor: each silo sends `[a_k * w_k, a_k, 1]` as float32 bytes, the
                    coordinator sums them with numpy (4 bytes/param).
  fedcohort         the project's path exactly (policies.ckks): each silo encrypts
                    `pack_update(w_k, a_k)` with `encrypt_vector` (wire format 2, seeded: c0
                    packed at 60 bits per residue plus one 32-byte seed) and sends it as uint8
                    (`blob_as_uint8`); the coordinator calls `sum_encrypted_uint8` with the
                    keyless aggregator context loaded once (adds the packed c0, lists the K
                    seeds); a silo decrypts the sum with the study's secret context
                    (`decrypt_vector`: expands the K seeds into c1, rebuilds TenSEAL's
                    ciphertexts) and takes `unpack_sum(...).mean`.
  nvflare-defaults  NVIDIA FLARE's HE path reproduced with the same TenSEAL calls (HEBuilder,
                    HEModelEncryptor, the CKKSVector FOBS decomposer, the in-time weighted
                    aggregator, HEModelDecryptor): CKKS N=8192, coeff [60, 40, 40], scale 2^40,
                    one symmetric key shared by all clients, relinearisation keys; each client
                    multiplies its layers by n_k and sends, per layer, the serialised
                    ciphertexts PLUS a serialised copy of the context; the server rebuilds a
                    context for every received ciphertext, adds, multiplies by 1/sum(n) and
                    serialises the result (again with a context copy per layer).

Per (scheme, P, K), medians of repetitions in this run (the 2-core machine is shared, so
compare ratios, not absolute milliseconds):

  bytes_per_param     one silo's upload bytes / P
  silo_encrypt_ms     one silo: weight + encrypt + serialise (plaintext: pack + float32 bytes);
                      median over the K silos' uploads
  coordinator_sum_ms  the K received byte strings -> the serialised aggregate, in one process,
                      deserialisation included (fedcohort: the context is loaded once per study,
                      outside this time; FLARE rebuilds one per ciphertext, inside it)
  decrypt_ms          a silo: the serialised aggregate -> the averaged parameters
  max_abs_error       max |averaged parameters - float64 weighted mean|

Writes bench/results/he_aggregation.json (and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tenseal as ts
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies import ckks  # noqa: E402
from policies.update import pack_update, unpack_sum  # noqa: E402

OUT = ROOT / "bench" / "results" / "he_aggregation.json"
SCHEMES = ("plaintext", "fedcohort", "nvflare-defaults")
SIZES = (10_000, 100_000, 1_000_000)
SILOS = (4, 16)
MAX_ROWS = 1000  # a_k = n_k / MAX_ROWS, as Silo.aggregation_weight does with cohort.max_rows
NVFLARE = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}
HEADLINE = (1_000_000, 16)
BAR = {"bytes_per_param_max": 32.0, "coordinator_ratio_max": 40.0}
AIM = {"bytes_per_param_max": 16.0, "coordinator_ratio_max": 20.0}

Received = list  # what the coordinator gets from K silos (bytes, or FLARE's per-layer tuples)


# ---------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def updates(p: int, k: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """K silos' weights w_k ~ N(0, 0.5), their training rows n_k, and the float64 weighted mean."""
    rng = np.random.default_rng(seed)
    ws = [rng.normal(0.0, 0.5, p) for _ in range(k)]
    n = rng.integers(20, MAX_ROWS + 1, size=k)
    mean = np.zeros(p)
    for w, nk in zip(ws, n):
        mean += float(nk) * w
    return ws, n, mean / float(n.sum())


class Scheme:
    """One aggregation path: silo encode, coordinator sum, silo decode."""

    name = ""
    layers = 1
    context_rebuild_ms = 0.0  # only FLARE rebuilds contexts

    def encode(self, w: np.ndarray, n_k: int) -> object: ...
    def upload_bytes(self, upload: object) -> int: ...
    def aggregate(self, received: Received, n: np.ndarray) -> object: ...
    def decode(self, aggregate: object) -> np.ndarray: ...


class Plaintext(Scheme):
    name = "plaintext"

    def encode(self, w, n_k):
        return pack_update(w, n_k / MAX_ROWS).astype(np.float32).tobytes()

    def upload_bytes(self, upload):
        return len(upload)  # also the aggregate

    def aggregate(self, received, n):
        arrays = [np.frombuffer(b, dtype=np.float32) for b in received]
        acc = arrays[0].copy()
        for a in arrays[1:]:
            acc += a
        return acc.tobytes()

    def decode(self, aggregate):
        return unpack_sum(np.frombuffer(aggregate, dtype=np.float32).astype(np.float64)).mean


class Fedcohort(Scheme):
    """policies.ckks as silo_node/codec.py and coordinator/server_app use it."""

    name = "fedcohort"

    def __init__(self) -> None:
        self.params = ckks.CkksParams()
        self.secret = ckks.new_secret_context(self.params)  # the key ceremony's study key
        self.aggregator_context_bytes = ckks.aggregator_context_bytes(self.secret)
        self.context_load_ms, self.agg = timed(lambda: ckks.load_context(self.aggregator_context_bytes, self.params))

    def encode(self, w, n_k):
        return ckks.blob_as_uint8(ckks.encrypt_vector(self.secret, pack_update(w, n_k / MAX_ROWS), params=self.params))

    def upload_bytes(self, upload):
        return upload.nbytes

    def aggregate(self, received, n):
        return ckks.sum_encrypted_uint8(self.agg, [ckks.blob_as_uint8(b) for b in received])

    def decode(self, aggregate):
        return unpack_sum(ckks.decrypt_vector(self.secret, aggregate)).mean

    def sum_path(self, received: Received, aggregate: np.ndarray) -> str:
        """Which path "auto" took: numpy-residue if a strict numpy-residue sum gives the same bytes."""
        try:
            strict = ckks.sum_encrypted_uint8(self.agg, [ckks.blob_as_uint8(b) for b in received], method="numpy-residue")
        except Exception:  # noqa: BLE001  (strict mode refuses format-1 blobs)
            return "tenseal"
        return "numpy-residue" if np.array_equal(strict, aggregate) else "tenseal"


class NvflareDefaults(Scheme):
    """NVIDIA FLARE's HE path with its defaults, call for call.

    nvflare/lighter/impl/he.py (HEBuilder): symmetric CKKS context, relin keys, client
    context with the secret key. app_opt/he/model_encryptor.py: values * n_iter, then
    `ts.ckks_vector(ctx, values)` per layer. app_opt/he/he_decomposers.py (FOBS): a
    CKKSVector travels as `(vec.serialize(), vec.context().serialize())` and is rebuilt with
    `ts.context_from` + `ts.ckks_vector_from`. app_common/aggregators/
    weighted_aggregation_helper.py: `total = total + v`, then `v * (1.0 / counts)`.
    app_opt/he/model_decryptor.py: `vec.decrypt(secret_key=ctx.secret_key())`.
    """

    name = "nvflare-defaults"

    def __init__(self, layers: int = 1) -> None:
        self.layers = layers
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=NVFLARE["poly_modulus_degree"],
                         coeff_mod_bit_sizes=list(NVFLARE["coeff_mod_bit_sizes"]),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        ctx.generate_relin_keys()
        ctx.global_scale = 2 ** NVFLARE["scale_bits"]
        client_file = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                    save_relin_keys=True)
        self.client = ts.context_from(client_file)  # load_tenseal_context_from_workspace, once per run
        self.context_rebuild_ms = 0.0

    def encode(self, w, n_k):
        out = []
        for layer in np.array_split(w, self.layers):
            vec = ts.ckks_vector(self.client, layer.ravel() * np.float64(n_k))
            out.append((vec.serialize(), vec.context().serialize()))  # CKKSVectorDecomposer.decompose
        return out

    def upload_bytes(self, upload):
        return sum(len(v) + len(c) for v, c in upload)

    def _recompose(self, data: tuple[bytes, bytes]) -> ts.CKKSVector:
        vec_data, ctx_data = data
        start = time.perf_counter()
        context = ts.context_from(ctx_data)
        self.context_rebuild_ms += (time.perf_counter() - start) * 1e3
        return ts.ckks_vector_from(context, vec_data)

    def aggregate(self, received, n):
        total: list[ts.CKKSVector | None] = [None] * self.layers
        for upload in received:
            for i, data in enumerate(upload):
                v = self._recompose(data)
                total[i] = v if total[i] is None else total[i] + v
        count = float(n.sum())
        out = []
        for t in total:
            v = t * (1.0 / count)
            out.append((v.serialize(), v.context().serialize()))  # the FOBS decomposer again
        return out

    def decode(self, aggregate):
        sk = self.client.secret_key()
        return np.concatenate([np.asarray(self._recompose(d).decrypt(secret_key=sk)) for d in aggregate])


# ---------------------------------------------------------------------------- measurement


def measure_point(schemes: list[Scheme], p: int, k: int, reps: dict[str, int], progress: Progress) -> list[dict]:
    """All schemes at one (P, K) on the same updates. Coordinator and decrypt repetitions are
    interleaved across schemes, so a burst of load on the shared machine hits all of them."""
    ws, n, mean = updates(p, k, seed=p + k)
    label = f"P={p:,} K={k}"
    task = progress.add_task(label, total=len(schemes) * k + 2 * sum(reps[key(s)] for s in schemes))
    enc_ms: dict[str, list[float]] = {}
    received: dict[str, list] = {}
    for s in schemes:
        enc_ms[key(s)], received[key(s)] = [], []
        for w, nk in zip(ws, n):
            ms, upload = timed(lambda: s.encode(w, int(nk)))
            enc_ms[key(s)].append(ms)
            received[key(s)].append(upload)
            progress.advance(task)
    coord_ms: dict[str, list[float]] = {key(s): [] for s in schemes}
    rebuild: dict[str, list[float]] = {key(s): [] for s in schemes}
    aggregate: dict[str, object] = {}
    for rep in range(max(reps.values())):
        for s in schemes:
            if rep >= reps[key(s)]:
                continue
            s.context_rebuild_ms = 0.0
            ms, aggregate[key(s)] = timed(lambda: s.aggregate(received[key(s)], n))
            coord_ms[key(s)].append(ms)
            rebuild[key(s)].append(s.context_rebuild_ms)
            progress.advance(task)
    dec_ms: dict[str, list[float]] = {key(s): [] for s in schemes}
    averaged: dict[str, np.ndarray] = {}
    for rep in range(max(reps.values())):
        for s in schemes:
            if rep >= reps[key(s)]:
                continue
            ms, averaged[key(s)] = timed(lambda: s.decode(aggregate[key(s)]))
            dec_ms[key(s)].append(ms)
            progress.advance(task)
    rows = []
    scale = float(np.max(np.abs(mean)))
    for s in schemes:
        sk = key(s)
        err = float(np.max(np.abs(averaged[sk] - mean)))
        upload = s.upload_bytes(received[sk][0])
        row = {
            "scheme": s.name, "P": p, "K": k, "layers": s.layers,
            "bytes_per_param": upload / p,
            "silo_encrypt_ms": statistics.median(enc_ms[sk]),
            "coordinator_sum_ms": statistics.median(coord_ms[sk]),
            "decrypt_ms": statistics.median(dec_ms[sk]),
            "max_abs_error": err,
            "max_rel_error": err / scale,
            "upload_bytes": upload,
            "aggregate_bytes": s.upload_bytes(aggregate[sk]),
            "reps": reps[sk],
        }
        if isinstance(s, Fedcohort):
            row["sum_path"] = s.sum_path(received[sk], aggregate[sk])
        if isinstance(s, NvflareDefaults):
            ctx_bytes = len(received[sk][0][0][1])
            row["context_copy_bytes"] = ctx_bytes
            row["context_bytes_share_of_upload"] = s.layers * ctx_bytes / upload
            row["context_rebuild_share_of_coordinator"] = statistics.median(
                r / c for r, c in zip(rebuild[sk], coord_ms[sk]))
        rows.append(row)
    progress.remove_task(task)
    del received, aggregate
    gc.collect()
    return rows


def key(s: Scheme) -> str:
    return f"{s.name}/{s.layers}"


def reps_for(p: int, scheme: str, args: argparse.Namespace) -> int:
    if scheme == "plaintext":
        return max(args.reps_small, 21)  # microseconds to milliseconds: many reps are cheap
    if p >= 1_000_000:
        return args.reps_1m_nvflare if scheme == "nvflare-defaults" else args.reps_1m
    return args.reps_small if p <= 10_000 else args.reps_100k


def ratio_rows(rows: list[dict]) -> None:
    floor = {(r["P"], r["K"]): r["coordinator_sum_ms"] for r in rows if r["scheme"] == "plaintext"}
    for r in rows:
        r["coordinator_ratio_to_plaintext"] = r["coordinator_sum_ms"] / floor[(r["P"], r["K"])]


def find(rows: list[dict], scheme: str, p: int, k: int, layers: int = 1) -> dict | None:
    return next((r for r in rows if (r["scheme"], r["P"], r["K"], r["layers"]) == (scheme, p, k, layers)), None)


def bars(rows: list[dict]) -> dict:
    p, k = HEADLINE
    fc, pt, nv = find(rows, "fedcohort", p, k), find(rows, "plaintext", p, k), find(rows, "nvflare-defaults", p, k)
    if not (fc and pt and nv):
        return {"note": f"P={p:,} K={k} not measured in this run"}
    ratio = fc["coordinator_sum_ms"] / pt["coordinator_sum_ms"]
    nv20 = find(rows, "nvflare-defaults", p, k, 20)
    return {
        "at": {"P": p, "K": k, "scheme": "fedcohort"},
        "bytes_per_param": {"value": fc["bytes_per_param"], "max": BAR["bytes_per_param_max"],
                            "met": fc["bytes_per_param"] <= BAR["bytes_per_param_max"]},
        "coordinator_ratio_to_plaintext": {"value": ratio, "max": BAR["coordinator_ratio_max"],
                                           "plaintext_ms": pt["coordinator_sum_ms"],
                                           "fedcohort_ms": fc["coordinator_sum_ms"],
                                           "met": ratio <= BAR["coordinator_ratio_max"]},
        "beats_nvflare_bytes_per_param": {"fedcohort": fc["bytes_per_param"], "nvflare_1_layer": nv["bytes_per_param"],
                                          "nvflare_20_layers": nv20["bytes_per_param"] if nv20 else None,
                                          "met": fc["bytes_per_param"] < nv["bytes_per_param"]},
        "beats_nvflare_coordinator_ms": {"fedcohort": fc["coordinator_sum_ms"],
                                         "nvflare_1_layer": nv["coordinator_sum_ms"],
                                         "nvflare_20_layers": nv20["coordinator_sum_ms"] if nv20 else None,
                                         "met": fc["coordinator_sum_ms"] < nv["coordinator_sum_ms"]},
        "aims": {
            "bytes_per_param": {"value": fc["bytes_per_param"], "max": AIM["bytes_per_param_max"],
                                "met": fc["bytes_per_param"] <= AIM["bytes_per_param_max"]},
            "coordinator_ratio_to_plaintext": {"value": ratio, "max": AIM["coordinator_ratio_max"],
                                               "met": ratio <= AIM["coordinator_ratio_max"]},
        },
        "note": "nvflare comparison is against its 1-layer (cheapest) layout; 20 layers shown for reference",
    }


# ---------------------------------------------------------------------------- output


def print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="Encrypted aggregation (medians, this run; ratio = coordinator / plaintext coordinator)")
    for col in ("scheme", "P", "K", "layers", "B/param", "silo enc ms", "coord ms", "ratio", "decrypt ms", "max abs err"):
        table.add_column(col, justify="left" if col == "scheme" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["scheme"], f"{r['P']:,}", str(r["K"]), str(r["layers"]), f"{r['bytes_per_param']:.2f}",
                      f"{r['silo_encrypt_ms']:.2f}", f"{r['coordinator_sum_ms']:.2f}",
                      f"{r['coordinator_ratio_to_plaintext']:.1f}x", f"{r['decrypt_ms']:.2f}", f"{r['max_abs_error']:.1e}")
    console.print(table)


def print_bars(console: Console, b: dict) -> None:
    if "at" not in b:
        console.print(b["note"])
        return

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]not met[/]"

    console.print(f"bar  bytes/param <= 32 at P=1M K=16: {b['bytes_per_param']['value']:.2f} {mark(b['bytes_per_param']['met'])}")
    console.print(f"bar  coordinator <= 40x plaintext: {b['coordinator_ratio_to_plaintext']['value']:.1f}x "
                  f"{mark(b['coordinator_ratio_to_plaintext']['met'])}")
    console.print(f"bar  beats nvflare on bytes/param: {b['beats_nvflare_bytes_per_param']['fedcohort']:.2f} vs "
                  f"{b['beats_nvflare_bytes_per_param']['nvflare_1_layer']:.2f} {mark(b['beats_nvflare_bytes_per_param']['met'])}")
    console.print(f"bar  beats nvflare on coordinator ms: {b['beats_nvflare_coordinator_ms']['fedcohort']:.1f} vs "
                  f"{b['beats_nvflare_coordinator_ms']['nvflare_1_layer']:.1f} {mark(b['beats_nvflare_coordinator_ms']['met'])}")
    console.print(f"aim  bytes/param <= 16: {mark(b['aims']['bytes_per_param']['met'])}; coordinator <= 20x: "
                  f"{mark(b['aims']['coordinator_ratio_to_plaintext']['met'])}")


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = max(r["K"] for r in rows)
    sizes = sorted({r["P"] for r in rows})
    width = 0.27
    for ax, field, label in ((axes[0], "coordinator_sum_ms", "coordinator ms (K received -> serialised sum)"),
                             (axes[1], "bytes_per_param", "upload bytes per parameter")):
        for j, scheme in enumerate(SCHEMES):
            vals = [(find(rows, scheme, p, k) or {}).get(field, np.nan) for p in sizes]
            bars_ = ax.bar([i + (j - 1) * width for i in range(len(sizes))], vals, width, label=scheme)
            ax.bar_label(bars_, labels=[f"{v:.3g}" for v in vals], fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"P={p:,}" for p in sizes])
        ax.set_ylabel(label)
        ax.set_title(f"K={k} silos, 1 layer, medians")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def quiet_native_stdout() -> Console:
    """TenSEAL's C++ code writes a warning to fd 1 for every multi-ciphertext vector (FLARE's
    layers): send fd 1 to /dev/null and give rich a duplicate of the real stdout."""
    width = max(Console().width, 130)
    real = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # pybind11 may route std::cout through sys.stdout
    return Console(file=real, width=width)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(p) for p in SIZES))
    parser.add_argument("--silos", default=",".join(str(k) for k in SILOS))
    parser.add_argument("--reps-small", type=int, default=15, help="repetitions at P <= 10k (median)")
    parser.add_argument("--reps-100k", type=int, default=9)
    parser.add_argument("--reps-1m", type=int, default=7)
    parser.add_argument("--reps-1m-nvflare", type=int, default=3)
    parser.add_argument("--layers-1m", type=int, default=20, help="extra nvflare run with this many layers at P=1M (0: skip)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    console = quiet_native_stdout()
    sizes = [int(s) for s in args.sizes.split(",")]
    silos = [int(k) for k in args.silos.split(",")]
    started = time.perf_counter()
    fedcohort = Fedcohort()
    schemes: list[Scheme] = [Plaintext(), fedcohort, NvflareDefaults(1)]
    layered = NvflareDefaults(args.layers_1m) if args.layers_1m else None
    rows: list[dict] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        points = [(p, k) for p in sizes for k in silos]
        overall = progress.add_task("all", total=len(points))
        for p, k in points:
            here = schemes + ([layered] if layered and p == 1_000_000 else [])
            rows += measure_point(here, p, k, {key(s): reps_for(p, s.name, args) for s in here}, progress)
            progress.advance(overall)
    ratio_rows(rows)
    result = {
        "rows": rows,
        "bars": bars(rows),
        "setup": {
            "updates": f"silo k: w_k ~ N(0, 0.5) of length P, n_k ~ U{{20..{MAX_ROWS}}} training rows; "
                       "reference = float64 sum(n_k w_k) / sum(n_k)",
            "plaintext": "pack_update(w_k, n_k/1000) -> float32 bytes; coordinator: np.frombuffer, += K times, "
                         ".tobytes(); silo: unpack_sum(...).mean",
            "fedcohort": {**fedcohort.params.model_dump(), "encryption_type": "symmetric", "slots": ckks.slots(fedcohort.params),
                          "layout": "[a_k * w, a_k, 1], a_k = n_k/1000 (P + 2 values, one blob)",
                          "wire": "format 2 seeded: 72-byte header, c0 of each ciphertext packed at 60 bits a residue "
                                  "(16 residues in 15 uint64 words), one 32-byte seed per contribution (K in a sum)",
                          "coordinator": "sum_encrypted_uint8(aggregator_ctx, uint8 views of the K byte strings), "
                                         "method auto (numpy on the packed words; expands no seed); aggregator "
                                         "context (no keys) loaded once per study",
                          "silo_decrypt": "decrypt_vector: unpack c0, expand and add the K seeds into c1, rebuild "
                                          "TenSEAL's serialisation, ts.ckks_vector_from + decrypt",
                          "aggregator_context_bytes": len(fedcohort.aggregator_context_bytes),
                          "aggregator_context_load_ms": fedcohort.context_load_ms},
            "nvflare-defaults": {**NVFLARE, "encryption_type": "symmetric, one key shared by all clients",
                                 "keys_in_context_copy": "relinearisation keys (FLARE's HEBuilder generates them)",
                                 "client": "per layer: ts.ckks_vector(ctx, layer * n_k); "
                                           "(vec.serialize(), vec.context().serialize())",
                                 "server": "per received layer: ts.context_from + ts.ckks_vector_from; total = total + v; "
                                           "v * (1.0 / sum(n)); (v.serialize(), v.context().serialize())",
                                 "silo_decrypt": "ts.context_from + ts.ckks_vector_from, decrypt(secret_key=...)",
                                 "layers": "split into equal layers with np.array_split; headline 1 layer",
                                 "not_included": "FOBS/msgpack framing and FLARE's network stack"},
            "timing": "medians; silo_encrypt_ms over the K silos' uploads; coordinator_sum_ms and decrypt_ms over "
                      "`reps` repetitions; everything in one process, one run",
            "max_abs_error": "max |averaged parameters decoded by a silo - float64 weighted mean|; max_rel_error divides "
                             "by max |mean|",
            "nvflare_error_source": "systematic: `v * (1.0 / sum(n))` encodes the scalar at 2^40 and rescales by the "
                                    "40-bit prime 1099510890497, while TenSEAL keeps the scale at exactly 2^40, so every "
                                    "value is off by a factor 2^40 / q - 1 = 6.7e-7 (relative); fedcohort never "
                                    "multiplies (depth 0) and its error is the encryption noise alone",
        },
        "versions": {"tenseal": ts.__version__, "numpy": np.__version__, "python": platform.python_version(),
                     "platform": platform.platform()},
        "machine": "2 cores, shared",
        "wall_s": round(time.perf_counter() - started, 1),
        "generated_by": "bench/he_aggregation.py",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, rows)
    print_bars(console, result["bars"])
    if plot(rows, out.with_suffix(".png")):
        console.print(f"plot: {out.with_suffix('.png')}")
    console.print(f"wrote {out} in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
