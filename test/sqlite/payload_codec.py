"""payload_codec — an independent Python reader/writer of payload formats 1 and 2.

Written from docs/PAYLOAD.md, not from the C code, so that the tests can
build payloads the extension never would (forged lengths, unknown tables,
duplicate names, extreme causal lengths...) with a valid checksum, and look
inside the payloads it does build.

The checksum (XXH3-64 of the stored body, seeded with XXH3-64 of header bytes
0..47) and zstd come from the system libraries through ctypes: libxxhash and
libzstd are already dependencies of the extension (scripts/deps installs
them), and Debian's python3 has no xxhash module by default.
"""
import ctypes
import struct
from dataclasses import dataclass, field

MAGIC = b"PGSY"
HEADER = struct.Struct("<4sBBH16sqqIIQ")   # 56 bytes
assert HEADER.size == 56
MAX_BODY = 1 << 30

NULL, INT, REAL, TEXT, BLOB = range(5)

_xx = ctypes.CDLL("libxxhash.so.0")
_xx.XXH3_64bits.restype = ctypes.c_uint64
_xx.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_xx.XXH3_64bits_withSeed.restype = ctypes.c_uint64
_xx.XXH3_64bits_withSeed.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]

_zs = ctypes.CDLL("libzstd.so.1")
_zs.ZSTD_compressBound.restype = ctypes.c_size_t
_zs.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
_zs.ZSTD_compress.restype = ctypes.c_size_t
_zs.ZSTD_compress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
_zs.ZSTD_decompress.restype = ctypes.c_size_t
_zs.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
_zs.ZSTD_isError.restype = ctypes.c_uint
_zs.ZSTD_isError.argtypes = [ctypes.c_size_t]
_zs.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
_zs.ZSTD_getFrameContentSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def xxh3(data, seed=None):
    if seed is None:
        return _xx.XXH3_64bits(data, len(data))
    return _xx.XXH3_64bits_withSeed(data, len(data), seed)


def checksum(header48, stored):
    return xxh3(stored, xxh3(bytes(header48[:48])))


def zcompress(data, level=1):
    cap = _zs.ZSTD_compressBound(len(data))
    out = ctypes.create_string_buffer(cap)
    n = _zs.ZSTD_compress(out, cap, data, len(data), level)
    assert not _zs.ZSTD_isError(n)
    return out.raw[:n]


def zdecompress(data, size):
    out = ctypes.create_string_buffer(max(size, 1))
    n = _zs.ZSTD_decompress(out, size, data, len(data))
    assert not _zs.ZSTD_isError(n) and n == size
    return out.raw[:size]


# ---- header ----------------------------------------------------------------


@dataclass
class Header:
    magic: bytes
    version: int
    flags: int
    reserved: int
    origin: bytes
    since: int
    until: int
    body_len: int
    stored_len: int
    checksum: int


def header(p):
    return Header(*HEADER.unpack_from(p, 0))


def seal(h, stored):
    """seal packs header h in front of the stored body with a fresh checksum."""
    raw = HEADER.pack(h.magic, h.version, h.flags, h.reserved, h.origin, h.since,
                      h.until, h.body_len, h.stored_len, 0)
    return raw[:48] + struct.pack("<Q", checksum(raw, stored)) + stored


def reseal(p):
    """reseal recomputes the checksum of p (header bytes 0..47 and body as they are)."""
    p = bytes(p)
    return p[:48] + struct.pack("<Q", checksum(p[:48], p[56:])) + p[56:]


def body(p):
    """body returns the decompressed body of a well-formed payload."""
    h = header(p)
    stored = bytes(p[56:])
    return zdecompress(stored, h.body_len) if h.flags & 1 else stored


def expected_header_error(p):
    """expected_header_error: the error the header check must give for p, or
    None when the header (and checksum) are valid. Mirrors docs/PAYLOAD.md."""
    fix = "Pass the value returned by sync_payload, unchanged."
    upgrade = "Upgrade this replica's pgsync to read payloads from newer replicas."
    again = "The payload was damaged or truncated in transit; fetch it again from its sender."
    if len(p) < 56:
        return f"not a pgsync payload: {len(p)} bytes is shorter than the 56-byte header. {fix}"
    h = header(p)
    if h.magic != MAGIC:
        return f'not a pgsync payload: bad magic. A payload starts with the bytes "PGSY". {fix}'
    if h.version not in (1, 2):
        return (f"unsupported payload format version {h.version} (this build reads versions 1 to 2). "
                f"{upgrade}")
    if h.flags & ~3 or h.reserved:
        return f"unsupported payload flags. Reserved header bits are set. {upgrade}"
    if h.since < 0 or h.until < h.since:
        return f"corrupt payload: invalid version range in header. {again}"
    if h.body_len > MAX_BODY:
        return (f"payload too large: body of {h.body_len} bytes exceeds the limit of {MAX_BODY}. "
                "Sync more often, or in smaller batches.")
    if h.stored_len + 56 != len(p):
        return (f"corrupt payload: length {len(p)} does not match the header (expected {h.stored_len + 56}). "
                "The payload was truncated or extended in transit; fetch it again from its sender.")
    if not h.flags & 1 and h.stored_len != h.body_len:
        return f"corrupt payload: stored and body lengths differ in an uncompressed payload. {again}"
    if checksum(p[:48], p[56:]) != h.checksum:
        return f"corrupt payload: checksum mismatch. {again}"
    return None


def corrupt(what):
    """corrupt: the full message of a body-level corruption error."""
    return ("corrupt payload: " + what +
            ". The payload was damaged or truncated in transit; fetch it again from its sender.")


# ---- body ------------------------------------------------------------------


def varint(v):
    assert 0 <= v < 1 << 64
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def zigzag(v):
    return ((v << 1) ^ (v >> 63)) & ((1 << 64) - 1)


def unzigzag(u):
    return (u >> 1) ^ -(u & 1)


def svarint(v):
    return varint(zigzag(v))


def enc_str(s):
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return varint(len(b)) + b


def enc_value(t, v):
    """enc_value encodes a value of type t without its type byte. REAL takes a
    float or its 8 raw bytes."""
    if t == NULL:
        return b""
    if t == INT:
        return svarint(v)
    if t == REAL:
        return v if isinstance(v, bytes) else struct.pack("<d", v)
    if t in (TEXT, BLOB):
        b = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
        return varint(len(b)) + b
    raise ValueError(t)


def value(v):
    """value: the (type, value) pair of a Python value."""
    if v is None:
        return (NULL, None)
    if isinstance(v, bool):
        return (INT, int(v))
    if isinstance(v, int):
        return (INT, v)
    if isinstance(v, float):
        return (REAL, v)
    if isinstance(v, str):
        return (TEXT, v)
    if isinstance(v, (bytes, bytearray)):
        return (BLOB, bytes(v))
    raise TypeError(type(v))


@dataclass
class Change:
    col: int
    type: int
    value: object
    hlc: int
    site: int


CHANGES, WHOLE, CANDIDATE, ABSENT = range(4)     # group kinds (format 2)
ATTR_FINGERPRINT, ATTR_SNAPSHOT, ATTR_SALT = 1, 2, 3
SNAP_BEGIN, SNAP_END = 1, 2


@dataclass
class Group:
    table: int
    pk: list                    # [(type, value)]; [] for a CANDIDATE
    cl: int
    cl_site: int
    changes: list = field(default_factory=list)
    kind: int = CHANGES
    hash: int = 0               # CANDIDATE: the salted key hash


@dataclass
class Table:
    name: str
    pk: list
    cols: list
    attrs: dict = field(default_factory=dict)   # format 2: tag -> bytes


@dataclass
class Body:
    sites: list
    tables: list
    rows: list
    version: int = 1


def encode_body(b, version=None):
    version = b.version if version is None else version
    out = bytearray(varint(len(b.sites)))
    for s in b.sites:
        assert len(s) == 16
        out += s
    out += varint(len(b.tables))
    for t in b.tables:
        out += enc_str(t.name) + varint(len(t.pk)) + varint(len(t.cols))
        for n in t.pk:
            out += enc_str(n)
        for n in t.cols:
            out += enc_str(n)
        if version >= 2:
            out += varint(len(t.attrs))
            for tag, val in t.attrs.items():
                out += varint(tag) + varint(len(val)) + val
    out += varint(len(b.rows))
    prev_hlc = 0
    for g in b.rows:
        out += varint(g.table << 2 | g.kind if version >= 2 else g.table)
        if version >= 2 and g.kind == CANDIDATE:
            out += struct.pack("<Q", g.hash) + varint(g.cl) + varint(g.cl_site)
            continue
        for t, v in g.pk:
            out += bytes([t]) + enc_value(t, v)
        if version >= 2 and g.kind == ABSENT:
            continue
        out += varint(g.cl) + varint(g.cl_site) + varint(len(g.changes))
        if not g.changes:
            continue
        ghlc, gsite = g.changes[0].hlc, g.changes[0].site
        out += svarint(ghlc - prev_hlc) + varint(gsite)
        prev_hlc = ghlc
        prev_col = -1
        for c in g.changes:
            own = c.hlc != ghlc or c.site != gsite
            delta = c.col - prev_col - 1
            head = c.type | (8 if own else 0) | ((delta if 0 <= delta < 15 else 15) << 4)
            out.append(head)
            if own:
                out += svarint(c.hlc - ghlc) + varint(c.site)
            if not 0 <= delta < 15:
                out += varint(c.col)
            out += enc_value(c.type, c.value)
            prev_col = c.col
    return bytes(out)


class _Cur:
    def __init__(self, b):
        self.b, self.i = b, 0

    def u8(self):
        v = self.b[self.i]
        self.i += 1
        return v

    def varint(self):
        r = shift = 0
        while True:
            byte = self.u8()
            r |= (byte & 0x7F) << shift
            if byte < 0x80:
                return r
            shift += 7

    def take(self, n):
        assert self.i + n <= len(self.b)
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def str_(self):
        return self.take(self.varint()).decode("utf-8", "surrogateescape")

    def value(self, t):
        if t == NULL:
            return None
        if t == INT:
            return unzigzag(self.varint())
        if t == REAL:
            return self.take(8)
        if t == TEXT:
            return self.take(self.varint()).decode("utf-8", "surrogateescape")
        if t == BLOB:
            return self.take(self.varint())
        raise ValueError(t)


def decode_body(raw, version=1):
    c = _Cur(bytes(raw))
    sites = [c.take(16) for _ in range(c.varint())]
    tables = []
    for _ in range(c.varint()):
        name = c.str_()
        npk, ncols = c.varint(), c.varint()
        t = Table(name, [c.str_() for _ in range(npk)], [c.str_() for _ in range(ncols)])
        if version >= 2:
            for _ in range(c.varint()):
                tag = c.varint()
                t.attrs[tag] = c.take(c.varint())
        tables.append(t)
    rows = []
    prev_hlc = 0
    for _ in range(c.varint()):
        t = c.varint()
        kind = CHANGES
        if version >= 2:
            t, kind = t >> 2, t & 3
        if kind == CANDIDATE:
            h = struct.unpack("<Q", c.take(8))[0]
            rows.append(Group(t, [], c.varint(), c.varint(), kind=kind, hash=h))
            continue
        pk = []
        for _ in tables[t].pk:
            ty = c.u8()
            pk.append((ty, c.value(ty)))
        if kind == ABSENT:
            rows.append(Group(t, pk, 0, 0, kind=kind))
            continue
        g = Group(t, pk, c.varint(), c.varint(), kind=kind)
        n = c.varint()
        if n:
            ghlc = (prev_hlc + unzigzag(c.varint())) & ((1 << 64) - 1)
            gsite = c.varint()
            prev_hlc = ghlc
            prev_col = -1
            for _ in range(n):
                head = c.u8()
                hlc, site = ghlc, gsite
                if head & 8:
                    hlc = (ghlc + unzigzag(c.varint())) & ((1 << 64) - 1)
                    site = c.varint()
                col = c.varint() if head >> 4 == 15 else prev_col + 1 + (head >> 4)
                prev_col = col
                g.changes.append(Change(col, head & 7, c.value(head & 7), hlc, site))
        rows.append(g)
    assert c.i == len(c.b), "trailing bytes"
    return Body(sites, tables, rows, version)


def decode(p):
    h = header(p)
    return h, decode_body(body(p), h.version)


def make(b, origin=b"\x01" * 16, since=0, until=1, compress=False, version=None, flags=None):
    """make seals a Body (or raw body bytes) into a payload (the Body's format
    version unless version says otherwise)."""
    if version is None:
        version = 1 if isinstance(b, (bytes, bytearray)) else b.version
    raw = b if isinstance(b, (bytes, bytearray)) else encode_body(b, version)
    stored = zcompress(raw) if compress else raw
    fl = (1 if compress else 0) if flags is None else flags
    h = Header(MAGIC, version, fl, 0, origin, since, until, len(raw), len(stored), 0)
    return seal(h, stored)


def hlc_of_ms(ms, logical=0):
    return (ms << 16) | logical


def uuid_bytes(s):
    return bytes.fromhex(s.replace("-", ""))
