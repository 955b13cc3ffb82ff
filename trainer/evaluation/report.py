"""The evaluation's results table in the seed README's format: one row per (classifier, feature extractor)."""
from __future__ import annotations

from collections.abc import Sequence

# How the table names each backbone (trainer.model.build_backbone's names); the widths tell the small nets apart
ARCHITECTURE_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
                      "resnet8": "ResNet-8 (32-64-128)", "resnet8_wide": "ResNet-8 (64-128-256)",
                      "resnet10": "ResNet-10 (64-128-256-512)"}

TABLE_COLUMNS = (
    ("classifier", "Linear Classifier"), ("extractor", "Feature Extractor"),
    ("architecture", "Architecture"), ("feature_dim", "Feature dimension"),
    ("head_dim", "Projection head dimension"), ("epochs", "Epochs"), ("top1", "Top-1"),
)


def result_row(classifier: str, extractor: str, architecture, feature_dim, head_dim, epochs, top1) -> dict:
    """One result as a dict (JSON-friendly raw values); top1 is a fraction in [0, 1] or None."""
    if top1 is not None and not 0.0 <= float(top1) <= 1.0:
        raise ValueError(f"top1 must be a fraction in [0, 1], got {top1}")
    return dict(classifier=classifier, extractor=extractor, architecture=architecture,
                feature_dim=feature_dim, head_dim=head_dim, epochs=epochs,
                top1=None if top1 is None else float(top1))


def _cell(key: str, value) -> str:
    if value is None or value == "":
        return "-"
    if key == "top1":
        return f"{100.0 * value:.1f}%"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """A centered markdown table of result_row dicts; missing values print as "-", top-1 as 70.3%."""
    header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join(":" + "-" * max(len(title), 3) + ":" for _, title in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(key, row.get(key)) for key, _ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"
