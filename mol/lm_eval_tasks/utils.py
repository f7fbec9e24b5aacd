"""lm-eval's hook into MoL's task definitions: `custom_dataset: !function utils.load_mcq` in
_mol_mcq.yaml. lm-eval imports this file by its path, so it holds no logic of its own."""

from __future__ import annotations


def load_mcq(mcq_set: str, mol_eval_dir: str | None = None, mol_limit: int | None = None, **_metadata):
    """The task's documents: {"test": the first `mol_limit` records of <mol_eval_dir>/<mcq_set>.jsonl}.

    lm-eval calls a custom_dataset with the task's metadata and dataset_kwargs as keyword
    arguments; the metadata it adds itself (version, config_source, ...) lands in `_metadata`.
    """
    from mol.lm_eval_tasks import mcq_dataset

    return mcq_dataset(mcq_set, mol_eval_dir, mol_limit)
