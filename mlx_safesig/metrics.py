"""Binary-verdict metrics of the training validation (``train.evaluate``)."""


def f1_report(tp, fp, fn, tn) -> dict:
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "accuracy": (tp + tn) / max(tp + fp + fn + tn, 1),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
    }


def confusion(rows, pred, label) -> list:
    """True positives, false positives, false negatives, true negatives among ``rows``."""
    return [(rows & pred & label).sum(), (rows & pred & ~label).sum(),
            (rows & ~pred & label).sum(), (rows & ~pred & ~label).sum()]


def rates(tp, fp, fn, tn) -> dict:
    return {"recall": tp / (tp + fn) if tp + fn else None,
            "false_positive_rate": fp / (fp + tn) if fp + tn else None}
