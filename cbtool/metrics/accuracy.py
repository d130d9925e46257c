"""Top-1/top-5 accuracy, mean cross-entropy, per-class accuracy and per-sample correctness."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cbtool.distributed import all_gather_objects, all_reduce_sum


class AccuracyAccumulator:
    """Sums over batches; ``result()`` reduces over ranks and returns percentages like timm's validate.py."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.topk = (1, 5) if num_classes >= 5 else (1,)
        self._sums = torch.zeros(4, dtype=torch.float64)  # count, top1, top5, loss
        self._class_correct = torch.zeros(num_classes, dtype=torch.float64)
        self._class_total = torch.zeros(num_classes, dtype=torch.float64)
        self._per_sample: dict[int, bool] = {}

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(max(self.topk), dim=1).indices
        hits = top.eq(labels[:, None])
        top1 = hits[:, 0]
        top5 = hits.any(dim=1) if len(self.topk) > 1 else top1
        batch = torch.tensor([labels.numel(), top1.sum().item(), top5.sum().item(), loss.item()], dtype=torch.float64)
        self._sums += batch
        labels_cpu = labels.cpu()
        top1_cpu = top1.cpu()
        self._class_total += torch.bincount(labels_cpu, minlength=self.num_classes).double()
        self._class_correct += torch.bincount(labels_cpu[top1_cpu], minlength=self.num_classes).double()
        if indices is not None:
            self._per_sample.update(zip(indices.tolist(), top1_cpu.tolist()))

    def result(self) -> dict:
        sums = all_reduce_sum(self._sums.clone())
        class_correct = all_reduce_sum(self._class_correct.clone())
        class_total = all_reduce_sum(self._class_total.clone())
        per_sample: dict[int, bool] = {}
        for part in all_gather_objects(self._per_sample):
            per_sample.update(part)  # type: ignore[arg-type]
        count = int(sums[0].item())
        if count == 0:
            return {"num_samples": 0, "top1": None, "top5": None, "loss": None, "per_class_top1": {}, "correct": ""}
        ordered = [per_sample[i] for i in sorted(per_sample)]
        # A value that does not exist is null with its reason beside it, never a number that means something else.
        reasons = {} if len(self.topk) > 1 else {"top5": f"top-5 needs 5 classes; the model has {self.num_classes}"}
        return {
            "num_samples": count,
            "top1": 100.0 * sums[1].item() / count,
            "top5": 100.0 * sums[2].item() / count if len(self.topk) > 1 else None,
            "loss": sums[3].item() / count,
            "per_class_top1": {
                str(c): 100.0 * class_correct[c].item() / class_total[c].item()
                for c in range(self.num_classes) if class_total[c] > 0
            },
            "correct": "".join("1" if hit else "0" for hit in ordered),
            **({"null_reasons": reasons} if reasons else {}),
        }
