"""The registered model's code, logged as an MLflow "model from code" (nothing is pickled).

    pipeline.core.registry.load_model("models:/gpt2-pipeline@best").predict(["Hello, I'm a language model,"])

Load it with pipeline.core.registry.load_model, which checks every file of the version (this one included)
against the sha256 the registry recorded before MLflow runs any of them; plain mlflow.pyfunc.load_model
runs this file unchecked, and load_context then checks the weights and config only. MLflow runs this file
when it loads the model; the rest of the pipeline never imports it.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class GPT2Generator(PythonModel):
    """predict(["prompt", ...]) -> ["completion", ...]; sampling with temperature 0.8 and top-k 50 by
    default (params: max_new_tokens, temperature, top_k, seed)."""

    def load_context(self, context) -> None:
        from pipeline.core.model.gpt2 import load_hf
        from pipeline.core.registry import verify_loaded

        verify_loaded(context.artifacts["checkpoint"])  # weights and config as registered, or refuse
        self.model = load_hf(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from eval.generate import sample
        from tokenization.tokenizer import encoding

        params = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0, **(params or {})}
        enc, out = encoding(), []
        for prompt in model_input:
            tokens = enc.encode_ordinary(prompt)
            budget = min(int(params["max_new_tokens"]), self.model.config.block_size - len(tokens))
            completion = sample(self.model, tokens, budget, temperature=float(params["temperature"]),
                                top_k=int(params["top_k"]), seed=int(params["seed"]))[0]
            out.append(enc.decode(completion))
        return out


mlflow.models.set_model(GPT2Generator())
