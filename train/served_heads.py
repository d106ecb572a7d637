"""A fine-tuned model's code, logged as an MLflow "model from code" (nothing is pickled).

    mlflow.pyfunc.load_model("models:/gpt2-pipeline-finetuned@best").predict(["a text", ...])

returns, per text, {head name: class index (classification), number (regression) or a class per token
(token classification)}. MLflow runs this file when it loads the model; the pipeline never imports it.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TaskPredictor(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.core.model.heads import load_hf

        self.model = load_hf(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[dict]:
        import torch

        from tokenization.tokenizer import encoding

        enc, out = encoding(), []
        block = self.model.config.block_size
        for text in model_input:
            idx = torch.tensor([enc.encode_ordinary(text)[:block]])
            with torch.no_grad():
                logits, _ = self.model(idx)
            row = {}
            for name, spec in self.model.specs.items():
                value = logits[name][0]
                row[name] = (value.item() if spec.kind == "regression" else value.argmax(-1).tolist())
            out.append(row)
        return out


mlflow.models.set_model(TaskPredictor())
