"""The records of a W&B run file (`run-*.wandb`, what an offline run writes and `wandb sync` uploads),
read with W&B's own protobuf definitions: tests check what a real run recorded (its exit code, the
artifacts it logged and used) without a server.

The file is a W&B header (":W&B", a 2-byte magic, a version byte) followed by records in the LevelDB
log format: 32 KiB blocks of chunks, each chunk a 7-byte header (CRC, 2-byte length, type: full,
first, middle, last) and its bytes; a block's last < 7 bytes are padding."""
import struct
from pathlib import Path
from typing import Iterator, List

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def chunks(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:       # zero padding to the end of the block
            pos += left
            continue
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body


def records(path: Path) -> List[wandb_internal_pb2.Record]:
    out = []
    for body in chunks(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(body)
        out.append(record)
    return out


def run_file(run_dir: Path) -> Path:
    """The run file of the one W&B run under `run_dir/wandb`."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")) + \
        sorted(Path(run_dir).glob("wandb/run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def of_type(path: Path, kind: str) -> list:
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]
