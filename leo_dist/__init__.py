"""leo_dist: data-parallel Leo and Lion with sharded momentum and 1-bit packed updates."""
from . import checkpoint, fsdp, hooks, misuse
from .collectives import average_gradients
from .functional import leo_update, lion_update
from .optim import Leo, Lion, leo_param_groups
from .packing import pack_mask, pack_signs, unpack_signs
from .prepare import prepare
from .sharded import ShardedLeo, ShardedLion
from .topology import node_mesh

__all__ = [
    "Leo",
    "average_gradients",
    "checkpoint",
    "fsdp",
    "hooks",
    "Lion",
    "ShardedLeo",
    "ShardedLion",
    "leo_param_groups",
    "leo_update",
    "misuse",
    "node_mesh",
    "lion_update",
    "pack_signs",
    "pack_mask",
    "prepare",
    "unpack_signs",
]
__version__ = "0.1.0"
