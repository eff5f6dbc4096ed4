"""The RML paper's published ML-1M numbers (MM'22, Table 2 and the ML-1M rows of Table 5).

Each row: (loss, AUC) for WC then CW, after FT-A, FT-B and FT-C in turn, i.e. 12 numbers in the
paper's column order. Typed in from the paper text; ``paper_value(method, stage, subset, metric)``
reads them. Table 5's "w/o Meta & Att" drops the attention branch, "w/o Meta & LSTM" the LSTM.
"""

from __future__ import annotations

from metactr.data.split import FT_STAGES, RML_SUBSETS

PAPER_LABELS = {"basic": "Basic", "wide_deep": "WD", "deepfm": "DeepFM", "din": "DIN", "dien": "DIEN",
                "gru4rec": "GRU4Rec", "lstm4rec": "LSTM4Rec", "mimn": "MIMN", "meta_e": "Meta-E", "melu": "MeLU",
                "mamo": "MAMO", "rml": "Ours (RML)", "rml_wo_meta": "w/o Meta",
                "rml_wo_meta_att": "w/o Meta & Att", "rml_wo_meta_lstm": "w/o Meta & LSTM"}

ML1M: dict[str, tuple[float, ...]] = {
    "basic": (0.6041, 0.6797, 0.4726, 0.6757, 0.6118, 0.6797, 0.4739, 0.6756, 0.5998, 0.6797, 0.4755, 0.6756),
    "wide_deep": (0.5989, 0.7041, 0.4679, 0.7423, 0.6082, 0.7212, 0.4753, 0.7183, 0.5842, 0.7350, 0.4670, 0.7315),
    "deepfm": (1.7490, 0.7231, 1.6585, 0.6725, 1.7330, 0.7239, 1.7252, 0.6692, 1.6424, 0.7233, 1.6522, 0.6833),
    "din": (1.8522, 0.7671, 0.6998, 0.7804, 1.9922, 0.7676, 0.6550, 0.7959, 1.8728, 0.7588, 0.6547, 0.7895),
    "dien": (3.8806, 0.7155, 4.2122, 0.5689, 3.9700, 0.7170, 4.1354, 0.6289, 3.9747, 0.7048, 4.3587, 0.6124),
    "gru4rec": (2.9831, 0.7219, 1.6285, 0.7372, 2.9831, 0.7249, 1.5997, 0.7385, 2.9051, 0.7172, 1.6766, 0.7422),
    "lstm4rec": (2.6343, 0.7842, 1.2620, 0.7718, 2.3866, 0.7812, 1.2463, 0.7761, 2.4063, 0.7859, 1.3125, 0.7685),
    "mimn": (3.0208, 0.7381, 0.5514, 0.5848, 2.9719, 0.7350, 0.4650, 0.7104, 3.0135, 0.7399, 0.4362, 0.7414),
    "meta_e": (1.1852, 0.7668, 0.7710, 0.8013, 1.1603, 0.7667, 0.7777, 0.8013, 1.0702, 0.7668, 0.7709, 0.8013),
    "melu": (2.5886, 0.7677, 1.4001, 0.7653, 2.5156, 0.7682, 1.4053, 0.7702, 2.3398, 0.7666, 1.4132, 0.7661),
    "mamo": (0.5928, 0.6934, 0.4906, 0.6575, 0.6068, 0.6949, 0.4884, 0.6550, 0.5969, 0.6993, 0.4863, 0.6596),
    "rml": (0.4642, 0.8316, 0.3454, 0.8054, 0.4881, 0.8013, 0.3253, 0.8326, 0.4730, 0.8167, 0.3001, 0.8480),
    "rml_wo_meta": (0.5266, 0.8016, 0.4834, 0.7876, 0.5108, 0.7819, 0.3882, 0.8217, 0.5152, 0.7831, 0.4023, 0.8205),
    "rml_wo_meta_att": (0.5336, 0.8006, 0.4203, 0.8289, 0.5103, 0.7812, 0.2679, 0.9010, 0.5144, 0.7782, 0.3481, 0.8673),
    "rml_wo_meta_lstm": (0.5622, 0.8110, 0.5135, 0.7817, 0.5606, 0.7931, 0.4034, 0.8101, 0.5399, 0.8027, 0.4285, 0.8190),
}

_STAGES = FT_STAGES
_SUBSETS = RML_SUBSETS
_METRICS = ("logloss", "auc")


def paper_value(method: str, stage: str, subset: str, metric: str) -> float | None:
    """The paper's number, or None where the paper has none (another method/stage)."""
    row = ML1M.get(method)
    if row is None or stage not in _STAGES or subset not in _SUBSETS or metric not in _METRICS:
        return None
    return row[_STAGES.index(stage) * 4 + _SUBSETS.index(subset) * 2 + _METRICS.index(metric)]
