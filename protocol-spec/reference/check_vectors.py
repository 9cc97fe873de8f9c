#!/usr/bin/env python3
"""Independent cross-check of fedlora's protocol test vectors (protocol-spec v0).

Written from the specification text (protocol-spec/0*.md), not from the Rust code. Uses only the
standard library (hashlib, hmac, struct, math, json) and the `cryptography` package for X25519,
AES and ChaCha20. Run from anywhere:

    python3 protocol-spec/reference/check_vectors.py

Exit status 0 when every check passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VECTORS = Path(__file__).resolve().parent.parent / "test-vectors"
PROTOCOL_VERSION = 0
P = (1 << 61) - 1  # §3.5
CHUNK_LEN = [7, 7, 7, 7, 4]

checks = 0


def check(cond: bool, what: str) -> None:
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def load(name: str) -> list[dict]:
    data = json.loads((VECTORS / name).read_text())
    check("gen_test_vectors" in data["generator"], f"{name}: generator named")
    return data["cases"]


def unhex(s: str) -> bytes:
    return bytes.fromhex(s)


def le16(x: int) -> bytes:
    return struct.pack("<H", x)


def le32(x: int) -> bytes:
    return struct.pack("<I", x)


def le64(x: int) -> bytes:
    return struct.pack("<Q", x)


def f32_from_hex(h: str) -> float:
    return struct.unpack(">f", bytes.fromhex(h))[0]


def f32_bits(x: float) -> str:
    return struct.pack(">f", x).hex()


def to_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --- §3.1 labels, HKDF (RFC 5869), X25519 -----------------------------------------------------


def label(purpose: str) -> bytes:
    return f"fedlora/v{PROTOCOL_VERSION}/{purpose}".encode("ascii")


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def x25519_pk(sk: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()


def x25519(sk: bytes, pk: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(pk))


# --- §3.2 session id, §5.1 graph seed, §3.3 / §3.6 / §3.4 derivations ------------------------


def params_bytes(p: dict) -> bytes:
    return (
        le32(p["degree"])
        + le32(p["threshold"])
        + bytes([p["ring_bits"], p["quant_bits"]])
        + unhex(p["clip_f32_hex"])[::-1]  # binary32 little-endian
        + le32(p["weight_bound"])
    )


def session_preimage(rnd: int, nonce: bytes, n: int, p: dict, manifest: list, keys: list) -> bytes:
    m = label("session") + le16(PROTOCOL_VERSION) + le64(rnd) + nonce + le32(n) + params_bytes(p)
    m += le64(len(manifest))
    for t in manifest:
        name = t["name"].encode("utf-8")
        m += le64(len(name)) + name + le64(len(t["shape"]))
        for d in t["shape"]:
            m += le32(d)
    m += le64(len(keys))
    for client, cipher_pk, mask_pk in keys:
        m += le32(client) + cipher_pk + mask_pk
    return m


def graph_seed(sid: bytes) -> bytes:
    return hashlib.sha256(label("graph") + sid).digest()


def pair_info(purpose: str, a: int, b: int) -> bytes:
    return label(purpose) + le32(min(a, b)) + le32(max(a, b))


def pair_seed(shared: bytes, sid: bytes, a: int, b: int) -> bytes:
    check(shared != bytes(32), "contributory X25519")
    return hkdf(sid, shared, pair_info("pair-seed", a, b), 32)


def share_key(shared: bytes, sid: bytes, a: int, b: int) -> bytes:
    check(shared != bytes(32), "contributory X25519")
    return hkdf(sid, shared, pair_info("share-key", a, b), 16)


def prg_key(seed: bytes, sid: bytes) -> bytes:
    return hkdf(sid, seed, label("prg-key"), 16)


def self_mask_commitment(seed: bytes, sid: bytes, client: int) -> bytes:
    """§3.7: SHA-256(label("self-mask-commitment") ‖ sid ‖ LE32(client) ‖ seed)."""
    return hashlib.sha256(label("self-mask-commitment") + sid + le32(client) + seed).digest()


def keystream(key: bytes, first_block: int, nblocks: int) -> bytes:
    """§3.4: block m = AES-128(key, BE128(m)), computed with raw AES (ECB) per block."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return b"".join(enc.update((first_block + m).to_bytes(16, "big")) for m in range(nblocks))


def prg_words(key: bytes, start: int, count: int) -> list[int]:
    """Words start .. start+count: word p is LE u32 of keystream bytes 4p .. 4p+4."""
    if count == 0:
        return []
    first, last = start // 4, (start + count - 1) // 4
    ks = keystream(key, first, last - first + 1)
    off = 4 * (start - 4 * first)
    return [struct.unpack_from("<I", ks, off + 4 * i)[0] for i in range(count)]


def check_kdf() -> None:
    sks: dict[int, tuple[bytes, bytes]] = {}
    for c in load("kdf.json"):
        t = c["type"]
        if t == "label":
            check(label(c["purpose"]) == unhex(c["label_hex"]), f"label {c['purpose']}")
        elif t == "session_id":
            keys = []
            for k in c["keys"]:
                csk, msk = unhex(k["cipher_sk_hex"]), unhex(k["mask_sk_hex"])
                sks[k["client"]] = (csk, msk)
                check(x25519_pk(csk) == unhex(k["cipher_pk_hex"]), "cipher_pk = X25519(sk, 9)")
                check(x25519_pk(msk) == unhex(k["mask_pk_hex"]), "mask_pk = X25519(sk, 9)")
                keys.append((k["client"], x25519_pk(csk), x25519_pk(msk)))
            check([k[0] for k in keys] == sorted(k[0] for k in keys), "keys sorted by id")
            pre = session_preimage(c["round"], unhex(c["nonce_hex"]), c["num_clients"], c["params"], c["manifest"], keys)
            check(pre == unhex(c["preimage_hex"]), "session id preimage (§3.2)")
            sid = hashlib.sha256(pre).digest()
            check(sid == unhex(c["session_id_hex"]), "session id")
            check(graph_seed(sid) == unhex(c["graph_seed_hex"]), "graph seed")
        elif t == "pair":
            sid, a, b = unhex(c["session_id_hex"]), c["a"], c["b"]
            zm = x25519(sks[a][1], x25519_pk(sks[b][1]))
            check(zm == x25519(sks[b][1], x25519_pk(sks[a][1])), "X25519 symmetric")
            zc = x25519(sks[a][0], x25519_pk(sks[b][0]))
            check(zm == unhex(c["mask_shared_hex"]) and zc == unhex(c["cipher_shared_hex"]), "shared secrets")
            seed = pair_seed(zm, sid, a, b)
            check(seed == pair_seed(zm, sid, b, a) == unhex(c["pair_seed_hex"]), "pairwise seed (§3.3)")
            check(share_key(zc, sid, b, a) == unhex(c["share_key_hex"]), "share key (§3.6)")
            check(prg_key(seed, sid) == unhex(c["prg_key_of_pair_seed_hex"]), "prg key of pair seed")
        elif t == "pair_seed":
            got = pair_seed(unhex(c["shared_hex"]), unhex(c["session_id_hex"]), c["a"], c["b"])
            check(got == unhex(c["pair_seed_hex"]), "pair_seed")
        elif t == "share_key":
            got = share_key(unhex(c["shared_hex"]), unhex(c["session_id_hex"]), c["a"], c["b"])
            check(got == unhex(c["share_key_hex"]), "share_key")
        elif t == "prg_key":
            check(prg_key(unhex(c["seed_hex"]), unhex(c["session_id_hex"])) == unhex(c["prg_key_hex"]), "prg_key")
        elif t == "advertise_signing_bytes":
            m = label("advertise") + le64(c["round"]) + unhex(c["nonce_hex"]) + le32(c["client"])
            m += unhex(c["cipher_pk_hex"]) + unhex(c["mask_pk_hex"])
            check(m == unhex(c["bytes_hex"]), "advertise signing bytes (§8.3)")
        elif t == "self_mask_commitment":
            seed, sid, client = unhex(c["seed_hex"]), unhex(c["session_id_hex"]), c["client"]
            pre = label("self-mask-commitment") + sid + le32(client) + seed
            check(pre == unhex(c["preimage_hex"]), "self-mask commitment preimage (§3.7)")
            check(self_mask_commitment(seed, sid, client) == unhex(c["commitment_hex"]), "self-mask commitment (§3.7)")
        else:
            raise AssertionError(f"unknown kdf case {t}")


def check_prg() -> None:
    for c in load("prg.json"):
        sid = unhex(c["session_id_hex"])
        key = prg_key(unhex(c["seed_hex"]), sid)
        check(key == unhex(c["prg_key_hex"]), "prg key")
        check(keystream(key, 0, 4) == unhex(c["keystream_first_64_hex"]), "keystream")
        # The same keystream through a library CTR mode with a zero 128-bit big-endian counter.
        ctr = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
        check(ctr == unhex(c["keystream_first_64_hex"]), "keystream = CTR with counter 0")
        check(prg_words(key, 0, len(c["first_words"])) == c["first_words"], "first words")
        for o in c["at_offset"]:
            check(prg_words(key, o["start_word"], len(o["words"])) == o["words"], "seek")
        ap = c["apply"]
        w = prg_words(key, ap["start_word"], len(ap["acc_in"]))
        plus = [(a + m) % 2**32 for a, m in zip(ap["acc_in"], w)]
        minus = [(a - m) % 2**32 for a, m in zip(ap["acc_in"], w)]
        check(plus == ap["plus"] and minus == ap["minus"], "signed application")


# --- §5.1 neighbour graph ------------------------------------------------------------------------


def neighbour_graph(seed: bytes, members: list[int], degree: int) -> tuple[list[int], bool, dict[int, list[int]]]:
    ring = sorted(members, key=lambda i: (hashlib.sha256(seed + le32(i)).digest(), i))
    m, half = len(ring), degree // 2
    complete = degree + 1 >= m or 2 * half + 1 >= m
    nb = {}
    for p, i in enumerate(ring):
        if complete:
            nb[i] = sorted(x for x in ring if x != i)
        else:
            nb[i] = sorted({ring[(p + d) % m] for d in range(1, half + 1)} | {ring[(p - d) % m] for d in range(1, half + 1)})
    return ring, complete, nb


def check_graph() -> None:
    for c in load("graph.json"):
        seed = graph_seed(unhex(c["session_id_hex"]))
        check(seed == unhex(c["graph_seed_hex"]), "graph seed")
        ring, complete, nb = neighbour_graph(seed, c["members"], c["degree"])
        check(ring == c["ring_order"], "ring order")
        check([hashlib.sha256(seed + le32(i)).hexdigest() for i in ring] == c["ring_keys_hex"], "ring keys")
        check(complete == c["complete"], "complete rule")
        for i in c["members"]:
            check(nb[i] == c["neighbours"][str(i)], f"neighbours of {i}")
            if not complete:
                check(len(nb[i]) == 2 * (c["degree"] // 2), "regular degree")


# --- rand_chacha's ChaCha20Rng (only to confirm the recorded draws) ---------------------------


def chacha20_u64s(seed: bytes, count: int) -> list[int]:
    """next_u64 of ChaCha20Rng::from_seed(seed) from a fresh generator: consecutive pairs of the
    ChaCha20 keystream's little-endian u32 words (low word first), counter and stream zero."""
    nbytes = 8 * count
    ks = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(nbytes))
    return [struct.unpack_from("<Q", ks, 8 * i)[0] for i in range(count)]


# --- §3.5 Shamir ---------------------------------------------------------------------------------


def chunks(secret: bytes) -> list[int]:
    out, off = [], 0
    for n in CHUNK_LEN:
        out.append(int.from_bytes(secret[off : off + n], "little"))
        off += n
    return out


def sample_coefficients(draws: list[int], t: int) -> tuple[list[list[int]], int]:
    """For d = 1..t-1, c = 0..4: repeat r = next_u64() >> 3 until r < p. Returns rows, draws used."""
    rows, i = [], 0
    for _ in range(1, t):
        row = []
        for _ in range(5):
            while True:
                r = draws[i] >> 3
                i += 1
                if r < P:
                    row.append(r)
                    break
        rows.append(row)
    return rows, i


def share_values(secret: bytes, coeffs: list[list[int]], holder: int) -> list[int]:
    x = holder + 1
    rows = [chunks(secret)] + coeffs
    return [sum(rows[d][c] * pow(x, d, P) for d in range(len(rows))) % P for c in range(5)]


def share_bytes(values: list[int]) -> bytes:
    return b"".join(le64(v) for v in values)


def parse_share(holder: int, b: bytes) -> list[int]:
    vals = [struct.unpack_from("<Q", b, 8 * i)[0] for i in range(5)]
    if any(v >= P for v in vals):
        raise ValueError(("NotAFieldElement", holder))
    return vals


def combine(shares: list[tuple[int, list[int]]], t: int) -> bytes:
    if t == 0:
        raise ValueError(("ZeroThreshold",))
    if len(shares) < t:
        raise ValueError(("TooFewShares", len(shares), t))
    used = sorted(shares, key=lambda s: s[0])
    for a, b in zip(used, used[1:]):
        if a[0] == b[0]:
            raise ValueError(("DuplicateHolder", a[0]))
    used = used[:t]
    xs = [h + 1 for h, _ in used]
    lam = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % P
                den = den * (xj - xi) % P
        lam.append(num * pow(den, P - 2, P) % P)
    out = b""
    for c, n in enumerate(CHUNK_LEN):
        v = sum(vals[c] * l for (_, vals), l in zip(used, lam)) % P
        if v >= 1 << (8 * n):
            raise ValueError(("Inconsistent",))
        out += v.to_bytes(n, "little")
    return out


def check_shamir() -> None:
    for c in load("shamir.json"):
        secret, t = unhex(c["secret_hex"]), c["threshold"]
        check(chacha20_u64s(unhex(c["chacha20_seed_hex"]), len(c["rng_u64"])) == c["rng_u64"], "ChaCha20 draws")
        coeffs, used = sample_coefficients(c["rng_u64"], t)
        check(used == len(c["rng_u64"]) and coeffs == c["coefficients"], "coefficient sampling")
        check(all(v < P for v in chunks(secret)), "chunks below p")
        for s, h in zip(c["shares"], c["holders"]):
            check(s["holder"] == h, "share order")
            vals = share_values(secret, coeffs, h)
            check(vals == s["values"] and share_bytes(vals) == unhex(s["bytes_hex"]), "share values")
            check(parse_share(h, unhex(s["bytes_hex"])) == vals, "share parse")
        by_holder = {s["holder"]: s["values"] for s in c["shares"]}
        for comb in c["combine"]:
            got = combine([(h, by_holder[h]) for h in comb["holders"]], t)
            check(got == unhex(comb["secret_hex"]), "combine")
    for c in load("bad_shamir.json"):
        try:
            if c["op"] == "parse":
                parse_share(c["holder"], unhex(c["share_hex"]))
            elif c["op"] == "combine":
                combine([(s["holder"], s["values"]) for s in c["shares"]], c["threshold"])
            else:
                if c["threshold"] == 0:
                    raise ValueError(("ZeroThreshold",))
            raise AssertionError(f"bad_shamir accepted: {c['name']}")
        except ValueError as e:
            err = e.args[0]
            check(err[0] == c["error"], f"bad_shamir {c['name']}: {err}")
            if err[0] in ("NotAFieldElement", "DuplicateHolder"):
                check(err[1] == c["holder_in_error"], "error holder")
            if err[0] == "TooFewShares":
                check(err[1] == c["got"], "error count")


# --- §3.6 share boxes ----------------------------------------------------------------------------


def box_nonce(s: int, r: int) -> bytes:
    return le32(s) + le32(r) + bytes(4)


def box_aad(sid: bytes, s: int, r: int) -> bytes:
    return label("share") + sid + le32(s) + le32(r)


def seal(key: bytes, sid: bytes, s: int, r: int, b_share: list[int], sk_share: list[int]) -> bytes:
    pt = le32(s) + le32(r) + share_bytes(b_share) + share_bytes(sk_share)
    return AESGCM(key).encrypt(box_nonce(s, r), pt, box_aad(sid, s, r))


def open_box(key: bytes, sid: bytes, s: int, r: int, ct: bytes):
    if len(ct) != 104:
        raise ValueError(("Unauthentic",))
    try:
        pt = AESGCM(key).decrypt(box_nonce(s, r), ct, box_aad(sid, s, r))
    except InvalidTag:
        raise ValueError(("Unauthentic",)) from None
    if len(pt) != 88 or pt[:4] != le32(s) or pt[4:8] != le32(r):
        raise ValueError(("Unauthentic",))
    try:
        return parse_share(r, pt[8:48]), parse_share(r, pt[48:88])
    except ValueError as e:
        raise ValueError(("Share(NotAFieldElement)", e.args[0][1])) from None


def check_share_box() -> None:
    for c in load("share_box.json"):
        sid, s, r, key = unhex(c["session_id_hex"]), c["sender"], c["receiver"], unhex(c["key_hex"])
        if "shared_hex" in c:
            z = x25519(unhex(c["sender_cipher_sk_hex"]), x25519_pk(unhex(c["receiver_cipher_sk_hex"])))
            check(z == unhex(c["shared_hex"]), "box shared secret")
            check(share_key(z, sid, s, r) == key, "box key")
        if "nonce_hex" in c:
            check(box_nonce(s, r) == unhex(c["nonce_hex"]) and box_aad(sid, s, r) == unhex(c["aad_hex"]), "nonce/aad")
        ct = seal(key, sid, s, r, c["self_mask_share"], c["mask_key_share"])
        check(ct == unhex(c["ciphertext_hex"]) and len(ct) == 104, "seal")
        check(open_box(key, sid, s, r, ct) == (c["self_mask_share"], c["mask_key_share"]), "open")
    for c in load("bad_share_box.json"):
        try:
            open_box(unhex(c["key_hex"]), unhex(c["session_id_hex"]), c["sender"], c["receiver"], unhex(c["ciphertext_hex"]))
            raise AssertionError(f"bad box opened: {c['name']}")
        except ValueError as e:
            check(e.args[0][0] == c["error"], f"bad box {c['name']}: {e.args[0]}")
            if c["error"] != "Unauthentic":
                check(e.args[0][1] == c["holder"], "holder")


# --- §5.3 quantization ---------------------------------------------------------------------------


def quantize(p: dict, values: list[float], weight: int, draws: list[int]) -> tuple[list[int], int]:
    b, q, clip, W = p["ring_bits"], p["quant_bits"], f32_from_hex(p["clip_f32_hex"]), p["weight_bound"]
    if not 1 <= weight <= W:
        raise ValueError("BadWeight")
    scale = float(2 ** (q - 1)) / clip
    factor = scale * weight / W
    words, clipped = [], 0
    for i, x in enumerate(values):
        if not math.isfinite(x):
            raise ValueError("NonFinite")
        if abs(x) > clip:
            clipped += 1
        v = min(max(x, -clip), clip) * factor
        fl = math.floor(v)
        u = (draws[i] >> 11) * (1.0 / 2**53)
        r = fl + 1 if u < v - fl else fl
        words.append(int(r) % 2**b)
    return words + [weight], clipped


def signed(w: int, b: int) -> int:
    return w - 2**b if w >= 2 ** (b - 1) else w


def dequantize(p: dict, sum_words: list[int]) -> tuple[list[float], int]:
    b, q, clip, W = p["ring_bits"], p["quant_bits"], f32_from_hex(p["clip_f32_hex"]), p["weight_bound"]
    scale = float(2 ** (q - 1)) / clip
    wsum = sum_words[-1]
    if wsum == 0:
        raise ValueError("EmptyAggregate")
    to_mean = W / (scale * wsum)
    return [to_f32(signed(s, b) * to_mean) for s in sum_words[:-1]], wsum


def error_bound(p: dict, survivors: int, wsum: int) -> float:
    scale = float(2 ** (p["quant_bits"] - 1)) / f32_from_hex(p["clip_f32_hex"])
    return survivors * p["weight_bound"] / (scale * wsum)


def check_quantization() -> None:
    for c in load("quantization.json"):
        p = c["params"]
        if c["type"] == "quantize":
            draws = c["rng_u64"]
            check(chacha20_u64s(unhex(c["chacha20_seed_hex"]), len(draws)) == draws, "ChaCha20 draws")
            check(len(draws) == len(c["values_f32_hex"]), "one draw per value")
            words, clipped = quantize(p, [f32_from_hex(h) for h in c["values_f32_hex"]], c["weight"], draws)
            check(words == c["words"] and clipped == c["clipped"], f"quantize {p}")
        else:
            mean, wsum = dequantize(p, c["sum"])
            check([f32_bits(m) for m in mean] == c["mean_f32_hex"] and wsum == c["weight_sum"], "dequantize")
            check(error_bound(p, c["survivors"], wsum) == c["error_bound"], "error bound")


# --- §5.2 / §5.3 parameter derivation ------------------------------------------------------------


def log2_tail(n: int, p: float, t: int) -> float:
    """log2 P[Bin(n, p) >= t], in log space."""
    if t == 0:
        return 0.0
    if t > n or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(t, n + 1)]
    m = max(terms)
    return min(0.0, (m + math.log(sum(math.exp(x - m) for x in terms))) / math.log(2))


def ceil_log2(n: int) -> int:
    return 0 if n <= 1 else (n - 1).bit_length()


def derive(r: dict) -> dict:
    n, delta, gamma = r["clients"], r["expected_dropout"], r["corrupt_fraction"]
    sigma, eta = r["security_bits"], r["failure_bits"]
    H = ceil_log2(n) + 1
    needed = max(r["min_quant_bits"] + H, (n * r["weight_bound"]).bit_length() + 1)
    b = r["ring_bits"] if r["ring_bits"] is not None else next(x for x in (8, 16, 24, 32) if x >= needed)
    q = min(b - H, 31)
    if r.get("max_quant_bits") is not None:
        q = min(q, r["max_quant_bits"])  # §5.3 precision cap (validity checked in derive_error)
    log2n = math.log2(n)
    k = 2
    while k + 1 < n:
        disc = log2n + (k // 2) * math.log2(delta + gamma)
        if disc <= -sigma:
            size = k + 1
            t = next((t for t in range(size // 2 + 1, size + 1) if log2n + log2_tail(k, gamma, t) <= -sigma), None)
            if t is not None:
                fail = log2n + log2_tail(size, delta, size - t + 1)
                if fail <= -eta:
                    return dict(degree=k, threshold=t, ring_bits=b, quant_bits=q, complete=False, fail=fail)
        k += 2
    t = min(n, max(n // 2 + 1, math.floor(gamma * n) + 1))
    fail = log2_tail(n, delta, n - t + 1)
    return dict(degree=n - 1, threshold=t, ring_bits=b, quant_bits=q, complete=True, fail=fail)


def check_params() -> None:
    for c in load("params.json"):
        d, p = derive(c["request"]), c["params"]
        got = (d["degree"], d["threshold"], d["ring_bits"], d["quant_bits"], d["complete"])
        want = (p["degree"], p["threshold"], p["ring_bits"], p["quant_bits"], c["complete_graph"])
        check(got == want, f"derive {c['request']['clients']}: {got} vs {want}")
        check(abs(d["fail"] - c["log2_failure"]) < 1e-6, "failure bound")


def fnum(v) -> float:
    return float(v)  # numbers, or the strings "NaN" / "inf" / "-inf" of bad_params.json


def ring_needed(n: int, quant_bits: int, W: int) -> int:
    return max(quant_bits + ceil_log2(n) + 1, (n * W).bit_length() + 1)


def validate_error(p: dict, n: int):
    """§5.5, in order; returns the ParamError variant or None."""
    clip = f32_from_hex(p["clip_f32_hex"])
    if n < 2:
        return "TooFewClients"
    if not (math.isfinite(clip) and clip > 0):
        return "BadClip"
    if p["weight_bound"] == 0:
        return "ZeroWeightBound"
    needed = ring_needed(n, p["quant_bits"], p["weight_bound"])
    if p["ring_bits"] not in (8, 16, 24, 32) or p["ring_bits"] < needed or p["quant_bits"] < 2:
        return "BadRingBits"
    complete = p["degree"] >= n - 1
    if not complete and (p["degree"] < 2 or p["degree"] % 2 != 0):
        return "BadDegree"
    size = min(p["degree"], n - 1) + 1
    t = p["threshold"]
    if t > size or 2 * t <= size:
        return "BadThreshold"
    return None


def derive_error(r: dict):
    """§5.2 request checks and §5.3 ring choice, in order; returns the ParamError variant or None."""
    n = r["clients"]
    if n < 2:
        return "TooFewClients"
    rate_ok = lambda x: math.isfinite(x) and 0.0 <= x < 1.0  # noqa: E731
    d, g = fnum(r["expected_dropout"]), fnum(r["corrupt_fraction"])
    if not (rate_ok(d) and rate_ok(g) and rate_ok(d + g)):
        return "BadRate"
    for e in (fnum(r["security_bits"]), fnum(r["failure_bits"])):
        if not (math.isfinite(e) and e > 0):
            return "BadExponent"
    clip = fnum(r["clip"])
    if not (math.isfinite(clip) and clip > 0):
        return "BadClip"
    if r["weight_bound"] == 0:
        return "ZeroWeightBound"
    needed = ring_needed(n, r["min_quant_bits"], r["weight_bound"])
    if r["ring_bits"] is not None:
        if not (r["ring_bits"] in (8, 16, 24, 32) and r["ring_bits"] >= needed):
            return "BadRingBits"
    elif needed > 32:
        return "RingTooNarrow"
    cap = r.get("max_quant_bits")
    if cap is not None and cap < max(r["min_quant_bits"], 2):
        return "BadExponent"
    return None


def check_bad_params() -> None:
    for c in load("bad_params.json"):
        if c["function"] == "validate":
            got = validate_error(c["params"], c["num_clients"])
        else:
            got = derive_error(c["request"])
        check(got == c["error"], f"bad params {c['name']}: {got}")
    for c in load("params.json"):
        check(derive_error(c["request"]) is None, "good request accepted")
        check(validate_error(c["params"], c["request"]["clients"]) is None, "derived params validate")


# --- §4.1.4 / §6.3 the client's unmask rule ------------------------------------------------------


def unmask_decision(me: int, neighbours: set[int], held: set[int], t: int, survivors: list[int], dropped: list[int]):
    """Returns the ClientError variant for one request, or None if the client answers."""
    for lst in (survivors, dropped):
        if any(a >= b for a, b in zip(lst, lst[1:])):
            return "UnsafeUnmaskRequest"
    s, d = set(survivors), set(dropped)
    if s & d or me not in s:
        return "UnsafeUnmaskRequest"
    if any(i != me and i in neighbours and i not in held for i in s | d):
        return "UnsafeUnmaskRequest"
    if any(j not in s and j not in d for j in held):
        return "UnsafeUnmaskRequest"
    if 1 + len(held & s) < t:
        return "BelowThreshold"
    return None


def check_bad_unmask() -> None:
    cases = load("bad_unmask_request.json")
    setup = cases[0]["setup"]
    n, t = setup["num_clients"], setup["params"]["threshold"]
    check(setup["params"]["degree"] + 1 >= n, "complete graph in this scenario (§5.1)")
    for c in cases[1:]:
        me, drop = c["client"], c["drop_at_share"]
        neighbours = set(range(n)) - {me}
        held = neighbours - ({drop} if drop is not None else set())
        answered = False
        for k, r in enumerate(c["requests"]):
            got = "Finished" if answered else unmask_decision(me, neighbours, held, t, r["survivors"], r["dropped"])
            if k + 1 < len(c["requests"]):
                check(got is None, f"{c['name']}: request {k} accepted")
                answered = True
            else:
                check(got == c["error"], f"bad unmask {c['name']}: {got}")


# --- §4.3 encoding -------------------------------------------------------------------------------


def enc_bytes(b: bytes) -> bytes:
    return le64(len(b)) + b


def enc_vec(items: list, f) -> bytes:
    return le64(len(items)) + b"".join(f(x) for x in items)


STAGES = ["AdvertiseKeys", "ShareKeys", "MaskedInput", "Unmask"]


def enc_keys(k: dict) -> bytes:
    return bytes(k["cipher_pk"]) + bytes(k["mask_pk"]) + enc_bytes(bytes(k["signature"]))


def enc_share(s: dict) -> bytes:
    return le32(s["sender"]) + le32(s["receiver"]) + enc_bytes(bytes(s["ciphertext"]))


def enc_rev(r: dict) -> bytes:
    return le32(r["owner"]) + bytes(r["share"])


def encode(kind: str, m: dict) -> bytes:
    if kind == "Setup":
        p = m["params"]
        clip = struct.pack("<f", p["clip"])
        body = le16(m["version"]) + le64(m["round"]) + bytes(m["nonce"]) + le32(m["client_id"]) + le32(m["num_clients"])
        body += le32(p["degree"]) + le32(p["threshold"]) + bytes([p["ring_bits"], p["quant_bits"]]) + clip + le32(p["weight_bound"])
        body += enc_vec(m["manifest"], lambda t: enc_bytes(t["name"].encode()) + enc_vec(t["shape"], le32))
        return b"\x01" + body
    if kind == "KeyBroadcast":
        return b"\x02" + enc_vec(m["keys"], lambda e: le32(e["client"]) + enc_keys(e["keys"]))
    if kind == "ShareBroadcast":
        return b"\x03" + enc_vec(m["shares"], enc_share)
    if kind == "UnmaskRequest":
        return b"\x04" + enc_vec(m["survivors"], le32) + enc_vec(m["dropped"], le32)
    if kind == "Abort":
        (variant, f), = m.items()
        if variant == "TooFewSurvivors":
            body = le32(0) + le32(STAGES.index(f["stage"])) + le32(f["survivors"]) + le32(f["threshold"])
        elif variant == "NeighbourhoodBelowThreshold":
            body = le32(1) + le32(STAGES.index(f["stage"])) + le32(f["client"]) + le32(f["holders"]) + le32(f["threshold"])
        elif variant == "ReconstructionFailed":
            body = le32(2) + le32(f["client"])
        else:
            body = le32(3) + enc_bytes(f["detail"].encode())
        return b"\x0f" + body
    if kind == "AdvertiseKeys":
        return b"\x11" + enc_keys(m)
    if kind == "ShareKeys":
        return b"\x12" + enc_vec(m["shares"], enc_share) + bytes(m["self_mask_commitment"])
    if kind == "MaskedInput":
        w = m["ring_bits"] // 8
        return b"\x13" + bytes([m["ring_bits"]]) + le32(len(m["words"])) + b"".join(x.to_bytes(w, "little") for x in m["words"])
    if kind == "UnmaskResponse":
        return b"\x14" + enc_vec(m["self_mask_shares"], enc_rev) + enc_vec(m["mask_key_shares"], enc_rev)
    raise AssertionError(kind)


SERVER_TAGS = {0x01, 0x02, 0x03, 0x04, 0x0F}
CLIENT_TAGS = {0x11, 0x12, 0x13, 0x14}


def decode_masked_input_error(body: bytes):
    """§4.3.2 checks, in order; returns the error or None."""
    if len(body) < 5:
        return {"Malformed": None}
    bits = body[0]
    if bits not in (8, 16, 24, 32):
        return {"BadRingBits": bits}
    n = struct.unpack_from("<I", body, 1)[0]
    if n > 1 << 28:
        return {"VectorTooLong": n}
    if len(body) - 5 != n * bits // 8:
        return {"VectorLength": {"expected": n * bits // 8, "got": len(body) - 5}}
    return None


class Malformed(Exception):
    pass


class Reader:
    """bincode 1.3.3 fixint little-endian reader (§4.3.1); every failure is Malformed."""

    LIMIT = 64 << 20

    def __init__(self, b: bytes):
        self.b, self.pos = b, 0

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.b) or self.pos + n > self.LIMIT:
            raise Malformed("truncated or over the limit")
        out = self.b[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.raw(n), "little")

    def f32(self) -> float:
        return struct.unpack("<f", self.raw(4))[0]

    def vec(self, item) -> list:
        count = self.uint(8)
        out = []
        for _ in range(count):  # a huge count fails on truncation, never allocates up front
            out.append(item())
        return out

    def string(self) -> str:
        try:
            return self.raw(self.uint(8)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed("utf-8") from e

    def enum(self, n: int) -> int:
        v = self.uint(4)
        if v >= n:
            raise Malformed(f"variant {v}")
        return v

    def end(self) -> None:
        if self.pos != len(self.b):
            raise Malformed("trailing bytes")


def decode_structured(tag: int, body: bytes) -> tuple[str, dict]:
    r = Reader(body)
    u32 = lambda: r.uint(4)  # noqa: E731
    keys = lambda: {"cipher_pk": list(r.raw(32)), "mask_pk": list(r.raw(32)), "signature": list(r.raw(r.uint(8)))}  # noqa: E731
    enc = lambda: {"sender": u32(), "receiver": u32(), "ciphertext": list(r.raw(r.uint(8)))}  # noqa: E731
    rev = lambda: {"owner": u32(), "share": list(r.raw(40))}  # noqa: E731
    if tag == 0x01:
        m = {"version": r.uint(2), "round": r.uint(8), "nonce": list(r.raw(32)), "client_id": u32(), "num_clients": u32()}
        m["params"] = {"degree": u32(), "threshold": u32(), "ring_bits": r.uint(1), "quant_bits": r.uint(1), "clip": r.f32(), "weight_bound": u32()}
        m["manifest"] = r.vec(lambda: {"name": r.string(), "shape": r.vec(u32)})
        kind = "Setup"
    elif tag == 0x02:
        kind, m = "KeyBroadcast", {"keys": r.vec(lambda: {"client": u32(), "keys": keys()})}
    elif tag == 0x03:
        kind, m = "ShareBroadcast", {"shares": r.vec(enc)}
    elif tag == 0x12:
        kind, m = "ShareKeys", {"shares": r.vec(enc), "self_mask_commitment": list(r.raw(32))}
    elif tag == 0x04:
        kind, m = "UnmaskRequest", {"survivors": r.vec(u32), "dropped": r.vec(u32)}
    elif tag == 0x0F:
        kind, v = "Abort", r.enum(4)
        if v == 0:
            m = {"TooFewSurvivors": {"stage": STAGES[r.enum(4)], "survivors": u32(), "threshold": u32()}}
        elif v == 1:
            m = {"NeighbourhoodBelowThreshold": {"stage": STAGES[r.enum(4)], "client": u32(), "holders": u32(), "threshold": u32()}}
        elif v == 2:
            m = {"ReconstructionFailed": {"client": u32()}}
        else:
            m = {"Cancelled": {"detail": r.string()}}
    elif tag == 0x11:
        kind, m = "AdvertiseKeys", keys()
    elif tag == 0x14:
        kind, m = "UnmaskResponse", {"self_mask_shares": r.vec(rev), "mask_key_shares": r.vec(rev)}
    else:
        raise AssertionError(tag)
    r.end()
    return kind, m


def decode(direction: str, b: bytes):
    """Returns (kind, message) or raises ValueError(error-json)."""
    tags = SERVER_TAGS if direction == "server" else CLIENT_TAGS
    if not b:
        raise ValueError({"Empty": None})
    if b[0] not in tags:
        raise ValueError({"UnknownTag": b[0]})
    if b[0] == 0x13:
        err = decode_masked_input_error(b[1:])
        if err:
            raise ValueError(err)
        w = b[1] // 8
        words = [int.from_bytes(b[6 + w * i : 6 + w * (i + 1)], "little") for i in range((len(b) - 6) // w)]
        return "MaskedInput", {"ring_bits": b[1], "words": words}
    try:
        return decode_structured(b[0], b[1:])
    except Malformed:
        raise ValueError({"Malformed": None}) from None


def check_codec() -> None:
    for c in load("codec.json"):
        check(encode(c["kind"], c["message"]) == unhex(c["bytes_hex"]), f"encode {c['name']}")
        check(decode(c["direction"], unhex(c["bytes_hex"])) == (c["kind"], c["message"]), f"decode {c['name']}")
    for c in load("bad_codec.json"):
        try:
            decode(c["direction"], unhex(c["bytes_hex"]))
            raise AssertionError(f"bad codec accepted: {c['name']}")
        except ValueError as e:
            check(e.args[0] == c["error"], f"bad codec {c['name']}: {e.args[0]}")


# --- §4 whole round ------------------------------------------------------------------------------


def check_round() -> None:
    for c in load("round.json"):
        cfg, p = c["config"], c["config"]["params"]
        inputs = c["inputs"]
        b = p["ring_bits"]
        check(all(0 <= w < 2**b for w in c["sum"]), "sum words in the ring")
        mean, wsum = dequantize(p, c["sum"] + [c["weight_sum"]])
        check([f32_bits(m) for m in mean] == c["mean_f32_hex"], "round mean = dequantized sum")
        surv = c["survivors"]
        check(wsum == sum(inputs[i]["weight"] for i in surv), "weight sum of survivors")
        clip = f32_from_hex(p["clip_f32_hex"])
        bound = error_bound(p, len(surv), wsum)
        check(abs(bound - c["error_bound"]) <= 1e-15, "error bound")
        for l in range(len(mean)):
            exact = sum(inputs[i]["weight"] * min(max(f32_from_hex(inputs[i]["values_f32_hex"][l]), -clip), clip) for i in surv) / wsum
            check(abs(mean[l] - exact) <= bound + 1e-6, f"mean within the bound at {l}")
        n_dropped_with_live = len(c["dropped"])  # complete graph: every dropped client has live neighbours
        check(c["masks_removed"] == len(surv) + n_dropped_with_live * len(surv), "masks removed")
        # Wire sizes from §4.3 (no signatures; every client reached the share stage; a dropped
        # client is one that stopped at the upload stage).
        check(all(d in (None, "upload") for d in c["drop_at"]), "drop schedule covered below")
        n, L = cfg["num_clients"], sum(math.prod(t["shape"]) for t in cfg["manifest"])
        setup = 1 + 68 + 8 + sum(8 + len(t["name"].encode()) + 8 + 4 * len(t["shape"]) for t in cfg["manifest"])
        key_broadcast = 1 + 8 + n * (4 + 32 + 32 + 8)
        shares = 1 + 8 + (n - 1) * (4 + 4 + 8 + 104)  # ShareBroadcast down; ShareKeys up adds the commitment
        share_keys = shares + 32  # §4.3: self_mask_commitment, 32 raw bytes after the shares (§3.7)
        request = 1 + 8 + 4 * len(surv) + 8 + 4 * len(c["dropped"])
        for i in range(n):
            up = (1 + 32 + 32 + 8) + share_keys
            down = setup + key_broadcast + shares
            if i in surv:
                up += (1 + 5 + (L + 1) * b // 8) + (1 + 8 + 44 * len(surv) + 8 + 44 * len(c["dropped"]))
                down += request
            check((c["bytes_up"][i], c["bytes_down"][i]) == (up, down), f"wire bytes of client {i}")


def main() -> int:
    for f in (check_kdf, check_prg, check_graph, check_shamir, check_share_box, check_quantization, check_params, check_bad_params, check_bad_unmask, check_codec, check_round):
        before = checks
        f()
        print(f"{f.__name__}: {checks - before} checks passed")
    print(f"all {checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
