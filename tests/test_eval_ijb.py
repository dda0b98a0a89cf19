"""IJB-style protocol: pooling, 1:1 and 1:N on synthetic template sets with known answers."""
import numpy as np
import pytest
from PIL import Image

from sf2dist.eval import (
    BenchmarkFormatError,
    align_face,
    evaluate_benchmark,
    identification_metrics,
    pool_templates,
    similarity_transform,
    tar_at_far,
    template_pair_scores,
)
from sf2dist.eval.ijb import REFERENCE_LANDMARKS
from tests.test_eval_extract import MeanColour

E = np.eye(8)


def unit(v):
    return np.asarray(v, dtype=np.float64) / np.linalg.norm(v)


def test_pooling_weights_media_not_images():
    # Template 7: three frames of one video along e0 (norms 1, 2, 3) and one photo along e1.
    # Template 3: one photo along e2.
    embeddings = np.stack([E[0], 2 * E[0], 3 * E[0], E[1], E[2]])
    template_ids = np.array([7, 7, 7, 7, 3])
    media_ids = np.array([100, 100, 100, 101, 102])
    templates, pooled = pool_templates(embeddings, template_ids, media_ids, normalize_images=True)
    np.testing.assert_array_equal(templates, [3, 7])
    np.testing.assert_allclose(pooled[1], unit(E[0] + E[1]), atol=1e-7)  # not (3 e0 + e1): media count once
    np.testing.assert_allclose(pooled[0], E[2], atol=1e-7)
    _, raw = pool_templates(embeddings, template_ids, media_ids)  # norms kept: the video's mean is 2 e0
    np.testing.assert_allclose(raw[1], unit(2 * E[0] + E[1]), atol=1e-7)
    _, weighted = pool_templates(embeddings, template_ids, media_ids, weights=[1, 1, 1, 0.5, 1], normalize_images=True)
    np.testing.assert_allclose(weighted[1], unit(E[0] + 0.5 * E[1]), atol=1e-7)


def test_template_pair_scores_and_missing_templates():
    templates, pooled = np.array([3, 7, 9]), np.stack([E[0], unit(E[0] + E[1]), E[1]]).astype(np.float32)
    scores = template_pair_scores(templates, pooled, np.array([[3, 7], [7, 9], [3, 9]]), chunk=2)
    np.testing.assert_allclose(scores, [np.sqrt(0.5), np.sqrt(0.5), 0.0], atol=1e-7)
    with pytest.raises(BenchmarkFormatError, match="template 8"):
        template_pair_scores(templates, pooled, np.array([[3, 8]]))


def identification_set():
    # Gallery: subjects 0..5 along e0..e5, plus a second template of subject 1 along e6.
    gallery = np.stack([E[0], E[1], E[2], E[3], E[4], E[5], E[6]])
    gallery_subjects = np.array([0, 1, 2, 3, 4, 5, 1])
    probes = np.stack(
        [
            E[0],  # subject 0: rank 1, score 1
            0.6 * E[1] + 0.8 * E[2],  # subject 1: subject 2 scores higher -> rank 2
            0.5 * (E[2] + E[3] + E[4] + E[5]),  # subject 2: four-way tie at 0.5 -> rank 4
            0.8 * E[3] + 0.6 * E[6],  # subject 3: 0.8 beats subject 1's best (0.6) -> rank 1
            0.7 * E[0] + np.sqrt(0.51) * E[7],  # non-mated, top score 0.7
            0.9 * E[1] + np.sqrt(0.19) * E[7],  # non-mated, top score 0.9
            E[7],  # non-mated, top score 0
        ]
    )
    probe_subjects = np.array([0, 1, 2, 3, 99, 98, 97])
    return probes, probe_subjects, gallery, gallery_subjects


def test_identification_known_answer():
    probes, probe_subjects, gallery, gallery_subjects = identification_set()
    metrics = identification_metrics(
        probes, probe_subjects, gallery, gallery_subjects, ranks=(1, 3, 5), fpir_targets=(0.34, 0.67, 0.1), chunk=3
    )
    assert (metrics["num_mated"], metrics["num_nonmated"]) == (4, 3)
    assert (metrics["gallery_templates"], metrics["gallery_subjects"]) == (7, 6)
    assert (metrics["rank_1"], metrics["rank_3"], metrics["rank_5"]) == (0.5, 0.75, 1.0)
    # Found at rank 1: scores 1.0 and 0.8; non-mated top scores 0.9, 0.7, 0.0.
    # FPIR <= 1/3 allows accepting above 0.7: both found probes -> TPIR 2/4.
    # FPIR <= 2/3 allows accepting above 0.0: still 2/4. 0.1 < 1/3 is not measurable.
    assert metrics["tpir_at_fpir"] == {"3e-01": 0.5, "7e-01": 0.5, "1e-01": None}


def test_tpir_threshold_comes_from_the_non_mated_top_scores():
    # Raising the 0.9 non-mated probe's top score above the found probe at 1.0 is not
    # possible; lowering it to 0.75 lets FPIR <= 1/3 accept above 0.7: unchanged 2/4.
    # Instead make the 0.7 one score 0.85: now FPIR <= 1/3 means accepting above 0.85
    # only, which keeps the 1.0 probe and drops the 0.8 one -> TPIR 1/4.
    probes, probe_subjects, gallery, gallery_subjects = identification_set()
    probes[4] = 0.85 * E[0] + np.sqrt(1 - 0.85**2) * E[7]
    metrics = identification_metrics(probes, probe_subjects, gallery, gallery_subjects, fpir_targets=(0.34,))
    assert metrics["tpir_at_fpir"] == {"3e-01": 0.25}
    closed_set = identification_metrics(probes[:4], probe_subjects[:4], gallery, gallery_subjects, fpir_targets=(0.34,))
    assert closed_set["tpir_at_fpir"] == {"3e-01": None}


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = scale * REFERENCE_LANDMARKS @ rotation.T + shift
    matrix = similarity_transform(REFERENCE_LANDMARKS, moved)
    np.testing.assert_allclose(matrix, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)


def test_alignment_samples_at_pixel_centres():
    # Landmarks at half the reference positions: the crop is the image scaled by 2, so crop
    # pixel (2i, 2j) must be image pixel (i, j) exactly (with pixel-centre coordinates).
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    crop = align_face(image, REFERENCE_LANDMARKS / 2)
    assert crop.shape == (112, 112, 3)
    np.testing.assert_allclose(crop[10:100:2, 10:100:2], image[5:50, 5:50], atol=1)
    shifted = align_face(np.pad(image, ((3, 53), (7, 49), (0, 0))), REFERENCE_LANDMARKS + [7, 3])
    np.testing.assert_array_equal(shifted[:56, :56], image)


def write_ijb(root, faces, pairs, probes=None, galleries=None):
    """An IJB-layout directory: PNG faces (solid colours), tid/mid, pairs, landmarks, 1:N CSVs."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    tid_mid, landmarks = [], []
    for index, (colour, template, medium) in enumerate(faces):
        name = f"{index}.png"
        Image.fromarray(np.full((112, 112, 3), colour, dtype=np.uint8)).save(root / "loose_crop" / name)
        tid_mid.append(f"{name} {template} {medium}")
        landmarks.append(" ".join([name, *(f"{v:.4f}" for v in REFERENCE_LANDMARKS.ravel()), "1.0"]))
    (root / "meta" / "syn_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / "syn_name_5pts_score.txt").write_text("\n".join(landmarks) + "\n")
    (root / "meta" / "syn_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    for name, rows in [("probe_mixed", probes), *((f"gallery_{g}", rows) for g, rows in (galleries or {}).items())]:
        if rows is not None:
            lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{t},{s},img/{t}.jpg" for t, s in rows]
            (root / "meta" / f"syn_1N_{name}.csv").write_text("\n".join(lines) + "\n")


# Solid colours whose mean-colour embeddings a, b, c (in to_tensor's [-1, 1]) are
# (1, -1, -1), (-1, 1, -1), (-1, -1, 1): unit cosines of -1/3 between any two.
A, B, C = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SYNTHETIC_FACES = [
    (A, 1, 10),  # template 1, subject A
    (B, 2, 20),  # template 2, subject B
    (C, 3, 30),  # template 3, subject C
    (A, 4, 40), (A, 4, 40), (A, 4, 40), (B, 4, 41),  # template 4, subject A: a video of A, a photo of B
    (B, 5, 50), (B, 5, 51),  # template 5, subject B: two photos
]
SYNTHETIC_PAIRS = [(4, 1, 1), (4, 2, 0), (1, 2, 0), (2, 3, 0), (2, 5, 1), (1, 3, 0)]


def test_ijb_directory_known_answer(tmp_path):
    write_ijb(
        tmp_path / "SYN",
        SYNTHETIC_FACES,
        SYNTHETIC_PAIRS,
        probes=[(3, 3), (4, 1), (5, 2)],
        galleries={"G1": [(1, 1), (2, 2)]},
    )
    result = evaluate_benchmark(MeanColour(), tmp_path / "SYN")
    metrics = result.metrics
    assert (result.name, result.kind, metrics["num_images"], metrics["num_templates"]) == ("SYN", "ijb", 9, 5)
    # Media-weighted, template 4 is along a + b: cosine 1/sqrt(3) with both a (genuine) and
    # b (impostor), a tie. Scores: genuine 1.0 and 0.577; impostors 0.577 and three at -1/3.
    # (Weighting images instead, 3a + b, would separate them: 0.943 against 0.)
    np.testing.assert_allclose(result.roc.far, [0, 0, 0.25, 1])
    np.testing.assert_allclose(result.roc.tar, [0, 0.5, 1, 1])
    np.testing.assert_allclose(tar_at_far(result.roc, [0.2, 0.25]), [0.5, 1.0])
    assert metrics["eer"] == pytest.approx(1 / 6)  # segment (0, 1/2) -> (1/4, 1)
    assert metrics["auc"] == pytest.approx(0.9375)  # 7.5 of 8 genuine/impostor orderings
    assert metrics["best_accuracy"] == pytest.approx(5 / 6)
    assert all(value is None for value in metrics["tar_at_far"].values())  # 4 impostor pairs measure no FAR <= 0.1
    search = metrics["identification"]["G1"]
    # Probe 4 ties subjects A and B at 0.577 (rank 2, ties count against it); probe 5 is rank 1.
    assert (search["num_mated"], search["num_nonmated"], search["rank_1"], search["rank_5"]) == (2, 1, 0.5, 1.0)


def test_ijb_directory_errors_name_the_file(tmp_path):
    write_ijb(tmp_path / "SYN", SYNTHETIC_FACES, [(4, 1, 1), (4, 8, 0)])
    with pytest.raises(BenchmarkFormatError, match="template 8"):
        evaluate_benchmark(MeanColour(), tmp_path / "SYN")
    (tmp_path / "SYN" / "meta" / "syn_template_pair_label.txt").write_text("4 1 2\n")
    with pytest.raises(BenchmarkFormatError, match="syn_template_pair_label.txt: pair 0 has label 2"):
        evaluate_benchmark(MeanColour(), tmp_path / "SYN")
    (tmp_path / "SYN" / "meta" / "syn_face_tid_mid.txt").write_text("0.png 1\n")
    with pytest.raises(BenchmarkFormatError, match="syn_face_tid_mid.txt:1: expected 'image_name template_id media_id'"):
        evaluate_benchmark(MeanColour(), tmp_path / "SYN")
