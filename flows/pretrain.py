"""Pretraining as a Prefect flow, scheduled and watched like the other jobs.

``pretrain_flow(data, out, options)`` runs :func:`equislide.stages.pretrain.pretrain` in one task (training
is one process's work: several GPUs are torchrun's job, not Dask's). The flow run shows a progress
artifact (``equislide-pretrain-progress``, epochs done / total, updated after every epoch) and, at the
end, a table artifact of the per-epoch metrics (``equislide-pretrain-metrics``). A rerun after a crash
with ``options={"resume": True}`` continues from the last epoch's state.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from equislide.flows._common import TASK_OPTIONS
from equislide.specs import PretrainSpec

__all__ = ["pretrain_flow", "pretrain_task"]


@task(name="pretrain", **TASK_OPTIONS)
def pretrain_task(spec: PretrainSpec, progress_id: Any = None) -> dict[str, Any]:
    """Train, updating the progress artifact after every epoch; the result as a JSON-able dict."""
    from equislide.stages.pretrain import pretrain

    logger = get_run_logger()

    def on_epoch(metrics: dict[str, Any]) -> None:
        logger.info("epoch %s/%s: loss %.4f", metrics["epoch"], spec.epochs, metrics["loss"])
        if progress_id is not None:
            update_progress_artifact(progress_id, 100.0 * metrics["epoch"] / spec.epochs)

    result = pretrain(spec, on_epoch=on_epoch)
    return {
        "weights": result.weights,
        "state_dir": result.state_dir,
        "history": result.history,
        "resumed_from": result.resumed_from,
        "warnings": result.warnings,
    }


@flow(name="equislide-pretrain")
def pretrain_flow(data: list[str], out: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a backbone on ``data`` into ``out`` (``*.safetensors``).

    Args:
        data: As ``equislide pretrain DATA...``.
        out: The weights file.
        options: Other :class:`~equislide.specs.PretrainSpec` fields (``self_supervised``, ``epochs``,
            ``arch``, ``resume``...).
    """
    spec = PretrainSpec(
        data=tuple(data),
        out=out,
        **{"command": ("prefect", "equislide-pretrain"), **dict(options or {})},
    )
    progress_id = create_progress_artifact(
        0.0, key="equislide-pretrain-progress", description="epochs done / total"
    )
    result = pretrain_task(spec, progress_id)
    rows = [{k: v for k, v in m.items() if not isinstance(v, (dict, list))} for m in result["history"]]
    create_table_artifact(rows, key="equislide-pretrain-metrics", description="per-epoch training metrics")
    for w in result["warnings"]:
        get_run_logger().warning(w)
    return result


if __name__ == "__main__":
    import sys

    pretrain_flow(sys.argv[2:], sys.argv[1])
