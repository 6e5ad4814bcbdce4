"""Nodes: blockdev-add, blockdev-del, query-named-block-nodes, x-blockdev-change."""
from ...drivers.quorum import quorum_add_child, quorum_del_child
from ...graph import blockdev_add as add_node
from ...graph import blockdev_del as del_node
from ...graph import nodes
from ...options import Opt
from ..registry import ArgError, CommandTable, QMPError

TABLE = CommandTable()


@TABLE.command("blockdev-add", boxed=True)
def blockdev_add(session, args):
    """Add a node from BlockdevOptions (the same keys as pyrep.blockdev_add)."""
    if "node-name" not in args:
        raise ArgError("'node-name' must be specified for the root node")
    add_node(args)


@TABLE.command("blockdev-del", Opt("node-name", "string", required=True))
def blockdev_del(session, args):
    """Delete a node added with blockdev-add; refused while anything (a parent, an export, a job) uses it."""
    del_node(args["node-name"])


@TABLE.command("query-named-block-nodes", Opt("flat", "bool", default=False))
def query_named_block_nodes(session, args):
    """Every node (implicit ones under their ``#blockN`` names, as in QEMU), in QEMU's BlockDeviceInfo shape."""
    return [device_info(n, flat=args["flat"]) for n in nodes().values() if not n.closed]


def image_info(node, flat=False, depth=0):
    """QEMU's ImageInfo of a node: filename, format, virtual-size and, down the chain, backing-image."""
    info = {"filename": node.filename or node.name, "format": node.drv.format_name, "virtual-size": node.length,
            "dirty-flag": False}
    try:
        extra = node.driver.get_info() or {}
    except Exception:  # noqa: BLE001 - a query never fails because one driver cannot say more
        extra = {}
    for key in ("actual-size", "cluster-size", "format-specific"):
        if key in extra:
            info[key] = extra[key]
    if extra.get("dirty"):
        info["dirty-flag"] = True
    backing = node.backing
    if backing is not None:
        info["backing-filename"] = backing.filename or backing.name
        if not flat and depth < 64:
            info["backing-image"] = image_info(backing, flat, depth + 1)
    return info


def device_info(node, flat=False):
    """QEMU's BlockDeviceInfo of a node."""
    depth, b = 0, node.backing
    while b is not None and depth < 256:
        depth, b = depth + 1, b.backing
    cache = node.opts.get("cache") or {}
    info = {"node-name": node.name, "drv": node.drv.format_name, "ro": node.read_only,
            "file": node.filename or node.name, "backing_file_depth": depth, "encrypted": False,
            "detect_zeroes": node.detect_zeroes, "write_threshold": 0,
            "cache": {"writeback": True, "direct": bool(cache.get("direct", False)),
                      "no-flush": bool(cache.get("no-flush", False))},
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": image_info(node, flat)}
    if node.backing is not None:
        info["backing_file"] = node.backing.filename or node.backing.name
    return info


@TABLE.command("x-blockdev-change", Opt("parent", "string", required=True), Opt("child", "string"),
               Opt("node", "string"))
def x_blockdev_change(session, args):
    """Add (``node``) or remove (``child``: a role such as ``children.1``, or a node name) a quorum child."""
    if "child" in args and "node" in args:
        raise QMPError("The parameters child and node are in conflict")
    if "node" in args:
        quorum_add_child(args["parent"], args["node"])
    elif "child" in args:
        quorum_del_child(args["parent"], args["child"])
    else:
        raise QMPError("Either child or node must be specified")
