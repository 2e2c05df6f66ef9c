"""Layout-free checkpoints: safetensors fragments placed in logical tensors by JSON metadata.

A checkpoint is a directory ``iter_NNNNNNN`` of safetensors files and a metadata.json that says,
for every logical tensor, which blocks of which files hold it; any TP/PP/DP layout loads any
checkpoint. The package's modules, lowest first:

- :mod:`~megaevo.checkpoint.format`: the names (directories, files, tensor kinds) and the metadata
  record (:class:`CheckpointMeta`, :class:`SavedLayout`, :class:`FileRecord`).
- :mod:`~megaevo.checkpoint.integrity`: checksums as files are written, checks of what is read.
- :mod:`~megaevo.checkpoint.safetensors_io`: safetensors headers, and files written a tensor at a time.
- :mod:`~megaevo.checkpoint.load`: :class:`LoadedCheckpoint` and a rank's view of it.
- :mod:`~megaevo.checkpoint.resolve`: which checkpoint a path names; inspection and verification.
- :mod:`~megaevo.checkpoint.save`: save plans, the :class:`Checkpointer`, the atomic commit.
"""
from megaevo.checkpoint.format import (CHECKSUM, CHECKSUMS, CRITIC_NAME_PREFIX, CRITIC_STATE_PREFIX,
                                       CRITIC_WEIGHTS_KIND, FORMAT_VERSION, KINDS, LATEST, METADATA, METADATA_CHECKSUM,
                                       STATE_KINDS, CheckpointError, CheckpointMeta, FileRecord, SavedLayout,
                                       StoredFragment, TensorEntry, dtype_name, file_tag, is_plain_name,
                                       iteration_dir, iteration_dirs, iteration_name, iteration_of, model_file,
                                       part_file, rng_file, rng_rank_of, tagged_model_file, temp_dir)
from megaevo.checkpoint.integrity import (RunningChecksum, check_file, check_finite, check_metadata, file_checksum,
                                          metadata_checksum, new_hash)
from megaevo.checkpoint.load import (LoadedCheckpoint, load_local_weights, read_local, read_local_state,
                                     set_rng_state)
from megaevo.checkpoint.resolve import (find_checkpoint, last_verified_checkpoint, latest_checkpoint,
                                        resolve_checkpoint, summarize_checkpoint, verify_checkpoint,
                                        with_intact_alternative)
from megaevo.checkpoint.save import (DEFAULT_TIMEOUT_S, TIMEOUT_ENV, Checkpointer, SavePlan, build_save_plan,
                                     commit_checkpoint, rng_state, write_safetensors)

__all__ = [
    "CHECKSUM", "CHECKSUMS", "CRITIC_NAME_PREFIX", "CRITIC_STATE_PREFIX", "CRITIC_WEIGHTS_KIND",
    "DEFAULT_TIMEOUT_S", "FORMAT_VERSION", "KINDS", "LATEST", "METADATA", "METADATA_CHECKSUM", "STATE_KINDS",
    "TIMEOUT_ENV",
    "CheckpointError", "CheckpointMeta", "Checkpointer", "FileRecord", "LoadedCheckpoint", "RunningChecksum",
    "SavePlan", "SavedLayout", "StoredFragment", "TensorEntry",
    "build_save_plan", "check_file", "check_finite", "check_metadata", "commit_checkpoint", "dtype_name",
    "file_checksum", "file_tag", "find_checkpoint", "is_plain_name", "iteration_dir", "iteration_dirs",
    "iteration_name", "iteration_of", "last_verified_checkpoint", "latest_checkpoint", "load_local_weights",
    "metadata_checksum", "model_file", "new_hash", "part_file", "read_local", "read_local_state",
    "resolve_checkpoint", "rng_file", "rng_rank_of", "rng_state", "set_rng_state", "summarize_checkpoint",
    "tagged_model_file", "temp_dir", "verify_checkpoint", "with_intact_alternative", "write_safetensors",
]
