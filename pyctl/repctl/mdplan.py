"""create-md, the local service that formats a metadata device: what it would write, checked
before anything is written (`plan_metadata`), then the formatting (`create_metadata`).

Its own module so that only `repctl create-md` imports the metadata code (and cffi with it):
every other command starts without it (docs/benchmarks.md, "CLI start").
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from repctl import metadata, render
from repctl.config import Config
from repctl.errors import ConfigError, ReplError


@dataclass(frozen=True)
class MetadataPlan:
    """What `create-md` would write, and what the metadata device holds now."""

    resource: str
    node: str
    device: str  # the data device
    metadata: str  # the metadata device
    data_bytes: int
    chunk_bytes: int
    nr_chunks: int
    bitmap_blocks: int
    need_bytes: int  # metadata the data needs
    have_bytes: int  # size of the metadata device
    existing: str | None  # what the metadata device holds now; None when all zero


def plan_metadata(config: Config, resource: str, node: str | None = None) -> MetadataPlan:
    """Check that `node`'s (default: this host's) metadata device of `resource` can be formatted
    and say what formatting writes. ReplError if the node has no metadata device, a device is
    missing or in use, or the metadata device is too small."""

    res = config.resource(resource)
    if node is None:
        me = config.local_node(resource)
    elif node in res.nodes:
        me = res.nodes[node]
    else:
        raise ConfigError(
            config.file, f"resources.{resource}.nodes", f"a node named {node!r}",
            ", ".join(res.nodes) or "none",
        )
    key = f"resources.{resource}.nodes.{me.name}"
    if me.metadata is None:
        raise ConfigError(
            config.file, f"{key}.metadata", "a metadata device to format",
            f"none (node {me.name} can only be a target of {resource})",
        )
    if Path("/dev/mapper", resource).exists():
        raise ReplError(
            f"resource {resource} is active (/dev/mapper/{resource} exists); "
            f"stop it first: repctl down {resource}"
        )
    data_bytes = _size_of(me.device, "data device", f"{key}.device")
    have = _size_of(me.metadata, "metadata device", f"{key}.metadata")
    _refuse_busy(me.metadata)
    chunk_sectors = res.chunk_size // 512
    data_sectors = data_bytes // 512
    if data_sectors == 0:
        raise metadata.MetadataError(f"{me.device}: the data device is empty")
    nr_chunks, bitmap_blocks = metadata.geometry(data_sectors, chunk_sectors)
    need = metadata.metadata_bytes(data_sectors, chunk_sectors)
    if have < need:
        raise metadata.MetadataError(
            f"{me.metadata}: the metadata device holds {render.human_bytes(have)} ({have} bytes), "
            f"needs {render.human_bytes(need)} ({need} bytes) for "
            f"{render.human_bytes(data_bytes)} of data in {render.human_bytes(res.chunk_size)} "
            "chunks"
        )
    try:
        sb = metadata.read_superblock(me.metadata)
        existing = f"dm-repl metadata (uuid {sb.uuid})" if sb else None
    except metadata.MetadataError:
        existing = "data that is not dm-repl metadata"
    return MetadataPlan(
        resource=resource, node=me.name, device=str(me.device), metadata=str(me.metadata),
        data_bytes=data_bytes, chunk_bytes=res.chunk_size, nr_chunks=nr_chunks,
        bitmap_blocks=bitmap_blocks, need_bytes=need, have_bytes=have, existing=existing,
    )


def _size_of(path: Path, what: str, key: str) -> int:

    try:
        return metadata.device_bytes(path)
    except OSError as exc:
        raise metadata.MetadataError(
            f"{path}: cannot open the {what} ({key}): {exc.strerror or exc}"
        ) from None


def _refuse_busy(path: Path) -> None:
    """A block device that someone holds open exclusively (a dm table, a mount) is refused."""

    try:
        if not stat.S_ISBLK(os.stat(path).st_mode):
            return
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        raise metadata.MetadataError(f"{path}: in use ({exc.strerror or exc})") from None
    os.close(fd)


def create_metadata(
    plan: MetadataPlan, *, force: bool = False, all_dirty: bool = False
) -> metadata.Superblock:
    """Format the metadata device of `plan`. Refuses a device that holds anything unless `force`."""

    if plan.existing and not force:
        raise metadata.MetadataError(
            f"{plan.metadata}: already holds {plan.existing}; use --force to overwrite it"
        )
    return metadata.format_metadata(
        plan.metadata, plan.data_bytes // 512, plan.chunk_bytes // 512,
        all_dirty=all_dirty, force=force,
    )


def describe_plan(plan: MetadataPlan, all_dirty: bool) -> list[str]:

    bitmap = plan.bitmap_blocks * metadata.BLOCK
    return [
        (f"  data      {plan.device}, {render.human_bytes(plan.data_bytes)} "
         f"({plan.data_bytes} bytes)"),
        f"  chunks    {plan.nr_chunks} of {render.human_bytes(plan.chunk_bytes)}, "
        + ("all marked dirty (a first sync copies everything)" if all_dirty else "all clean"),
        (f"  bitmap    {plan.bitmap_blocks} blocks ({render.human_bytes(bitmap)}); "
         f"metadata uses {render.human_bytes(plan.need_bytes)} of "
         f"{render.human_bytes(plan.have_bytes)}"),
    ]
