"""What the SphereFace2 paper says about each row of the reproduction's tables.

Source: Y. Wen, W. Liu, A. Weller, B. Raj, R. Singh, "SphereFace2: Binary Classification is
All You Need for Deep Face Recognition", ICLR 2022, arXiv:2108.01513.

`DIRECTIONS` holds the paper's *direction* for a row against the row it is compared with
(+1: the row is higher, −1: lower): the claims its text and tables make. `FIGURES` holds
numbers, each with where it was taken from. Only numbers whose source can be named are
here: the per-row cells of the paper's Tables 2 and 5 and the curves of Fig. 10 were not
available to check when this module was written, so they are left out rather than guessed
(a table shows the direction and the claim instead). Add a figure with its table, row and
column once it has been read off the paper.
"""
from __future__ import annotations

SOURCE = ("Wen, Liu, Weller, Raj, Singh: SphereFace2: Binary Classification is All You Need for Deep Face "
          "Recognition, ICLR 2022 (arXiv:2108.01513)")

# experiment -> row name (or loss name, for the noise rows) -> +1 / -1 against the row's reference
DIRECTIONS: dict[str, dict[str, int]] = {
    # Table 5: SphereFace2 above every softmax-based loss, on every benchmark
    "losses": {"cosface": -1, "arcface": -1, "sphereface": -1, "softmax": -1},
    # Table 2: each principle adds accuracy to the binary loss
    "ablation": {"balance-tuned": +1, "mining": +1, "margin": +1, "adjustment": +1},
    # Fig. 10 (left): SphereFace2 degrades less than CosFace and ArcFace as label noise grows
    "noise": {"cosface": -1, "arcface": -1},
}

CLAIMS: dict[str, str] = {
    "losses": "Table 5: trained on the same data (VGGFace2) with the same backbone, SphereFace2 outperforms the "
              "softmax-based losses; the gaps are largest at IJB-B/C's low false accept rates.",
    "ablation": "Table 2: on its validation sets (LFW, AgeDB-30, CA-LFW, CP-LFW; 6,000 pairs each), "
                "positive/negative balance, easy/hard mining and an angular margin, then the similarity "
                "adjustment, each improve the naive one-vs-all binary loss.",
    "noise": "Fig. 10 (left): as a growing share of the training labels is replaced by other identities, "
             "SphereFace2 keeps more of its accuracy than CosFace and ArcFace.",
}

# Numbers quoted with their source; "checked" says whether they were compared with the paper itself.
FIGURES: list[dict] = [
    {"experiment": "losses", "rows": ["sphereface2-C", "sphereface2-A", "sphereface2-M"],
     "what": "SphereFace2, IJB-B TAR@FAR=1e-5 (%)", "value": "85.4",
     "source": "issue #17, quoting the paper's Table 5", "checked": False},
    {"experiment": "losses", "rows": ["cosface", "arcface", "sphereface", "softmax"],
     "what": "softmax-based losses, IJB-B TAR@FAR=1e-5 (%)", "value": "79.6–80.8",
     "source": "issue #17, quoting the paper's Table 5", "checked": False},
    {"experiment": "losses", "rows": [], "what": "spread of verification accuracies between the losses",
     "value": "about 0.3 points", "source": "issue #17, summarising the paper's Table 5", "checked": False},
]


def direction(experiment: str, row: str) -> int | None:
    """The paper's direction for `row` against its reference (noise rows by their loss); None: no claim."""
    name = row.split("@")[0] if experiment == "noise" else row
    return DIRECTIONS.get(experiment, {}).get(name)


def figures(experiment: str) -> list[dict]:
    return [figure for figure in FIGURES if figure["experiment"] == experiment]
