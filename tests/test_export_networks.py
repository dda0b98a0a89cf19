"""ONNX export of the registered networks (#26 item 4): one network of each family at 112
checked against PyTorch and routed by insightface's rule to its recognition model, the
external-data path for weights over protobuf's limit, the rule's refusals, and the table of
`make bench-models`."""
from __future__ import annotations

import pytest
import torch

from sf2dist import export
from sf2dist.bench.models import NetworkFigures, eval_twins, to_markdown
from sf2dist.export import (InsightFaceRoute, export_backbone, external_data_file, insightface_route,
                            missing_onnx_packages)
from sf2dist.export import main as export_main
from sf2dist.models import create_backbone

pytestmark = pytest.mark.skipif(bool(missing_onnx_packages()), reason=f"ONNX export needs {missing_onnx_packages()}")


def faces(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])  # arcface_torch's IResNet, MobileFaceNet and ViT
def test_each_family_exports_checked_and_routes_to_insightfaces_recognition_model(tmp_path, name):
    torch.manual_seed(0)
    model = create_backbone(name, embedding_dim=64)
    report = export_backbone(model, faces(112), tmp_path / f"{name}.onnx", "onnx")
    assert report.checked_batch_sizes == (2, 3) and report.max_abs_error < 1e-3
    assert report.external_data is None and not external_data_file(tmp_path / f"{name}.onnx").exists()
    route = insightface_route(report.path)
    assert route.recognition and route.model == "ArcFaceONNX"
    assert (route.input_mean, route.input_std) == (127.5, 127.5)  # (pixel - 127.5) / 127.5, as sf2dist scales


def test_weights_over_the_limit_go_to_a_sidecar_and_the_pair_is_checked(tmp_path, monkeypatch, capsys):
    import onnx

    model = create_backbone("smallcnn", embedding_dim=16, input_size=48)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    path, sidecar = tmp_path / "backbone.onnx", tmp_path / "backbone.onnx.data"
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", export.model_bytes(model) - 1)
    export_main(["--backbone-weights", str(tmp_path / "backbone.pth"), "--backbone", "smallcnn", "--embedding-dim",
                 "16", "--image-size", "48", "--format", "onnx"])
    lines = capsys.readouterr().out.splitlines()
    # the printed result names the sidecar, and onnxruntime's check ran on the pair
    assert f"wrote {path} (onnx, weights in {sidecar} (keep it beside the .onnx))" in lines[0]
    assert "over batches of (2, 3)" in lines[0]
    assert lines[1] == (
        "insightface's model zoo (insightface.model_zoo.get_model) would not load it as its recognition model: its "
        "input is 48x48; insightface routes to its recognition model only square inputs of at least 112 whose side "
        "is a multiple of 16"
    )
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {sidecar.name}
    assert path.stat().st_size < sidecar.stat().st_size  # the weights are in the sidecar

    # at the limit: one self-contained file again, and the old sidecar does not linger beside it
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", export.model_bytes(model))
    report = export_backbone(model, faces(48), path, "onnx")
    assert report.external_data is None and not sidecar.exists()
    assert report.checked_batch_sizes == (2, 3) and report.max_abs_error < 1e-4


def graph_file(path, sides, inputs=1, outputs=1, node_names=("node_Identity",), channels=3):
    """An ONNX file with `inputs` float inputs [batch, channels, H, W] and `outputs` outputs; what the rule reads."""
    import onnx
    from onnx import TensorProto, helper

    height, width = sides
    values = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["batch", channels, height, width])
              for i in range(inputs)]
    results = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)]
    nodes = [helper.make_node("Identity", ["x0"], [f"t{k}"], name=name) for k, name in enumerate(node_names)]
    nodes += [helper.make_node("Identity", ["x0"], [f"y{i}"], name=f"out{i}") for i in range(outputs)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", values, results)), str(path))
    return path


def test_insightfaces_rule_refuses_what_its_recognition_model_cannot_take(tmp_path):
    assert insightface_route(graph_file(tmp_path / "a.onnx", (112, 112))).recognition
    assert insightface_route(graph_file(tmp_path / "b.onnx", (128, 128))).recognition  # any multiple of 16 from 112
    small = insightface_route(graph_file(tmp_path / "c.onnx", (48, 48)))
    assert small.model is None and not small.recognition and "48x48" in small.reason
    odd = insightface_route(graph_file(tmp_path / "d.onnx", (120, 120)))
    assert odd.model is None and "multiple of 16" in odd.reason
    assert insightface_route(graph_file(tmp_path / "e.onnx", (112, 128))).model is None  # not square
    two = insightface_route(graph_file(tmp_path / "f.onnx", (112, 112), inputs=2))
    assert two.model == "ArcFaceONNX" and not two.recognition and "only the first of its 2 inputs" in two.reason
    # the sides insightface gives to its other models, and its detector's many outputs
    assert insightface_route(graph_file(tmp_path / "g.onnx", (192, 192))).model == "Landmark"
    assert insightface_route(graph_file(tmp_path / "h.onnx", (128, 128), inputs=2)).model == "INSwapper"
    assert insightface_route(graph_file(tmp_path / "i.onnx", (640, 640), outputs=9)).model == "SCRFD"
    # an MXNet-style file that scales inside (Sub and Mul among its first nodes) is fed raw pixels
    mxnet = insightface_route(graph_file(tmp_path / "j.onnx", (112, 112), node_names=("_minus0", "_mul0")))
    assert (mxnet.input_mean, mxnet.input_std) == (0.0, 1.0) and not mxnet.recognition


def test_the_bench_table_has_a_row_per_network():
    taken = InsightFaceRoute("ArcFaceONNX", True, "ArcFaceONNX for 112x112 faces", 127.5, 127.5)
    refused = InsightFaceRoute(None, False, "its input is 48x48")
    rows = [
        NetworkFigures("r18", 112, 24_000_000, 96_000_000, 12.345, 10.5, 2.5e-5, 96_100_000, False, taken,
                       twins=("iresnet18",)),
        NetworkFigures("vit_h", 112, 750_000_000, 3_000_000_000, 900.0, 800.0, 3e-4, 3_001_000_000, True, taken),
        NetworkFigures("smallcnn", 48, 100_000, 400_000, 0.5, 0.4, 1e-6, 410_000, False, refused),
        NetworkFigures("broken", 112, 10, 40, 1.0, onnx_error="RuntimeError: no"),
    ]
    text = to_markdown(rows, batch_size=8, repeats=5, machine="test machine", command="bench", seconds=12)
    lines = text.splitlines()
    assert lines[0].startswith("## Every network") and "Machine: test machine." in lines
    assert "| r18 (= iresnet18) | 112 | 24.00M | 12.35 | 10.50 | 2.5e-05 | 96.1 MB | recognition model |" in lines
    assert ("| vit_h | 112 | 750.00M | 900.00 | 800.00 | 3.0e-04 | 3,001.0 MB (with .onnx.data) | recognition model |"
            in lines)
    assert "| smallcnn | 48 | 0.10M | 0.50 | 0.40 | 1.0e-06 | 0.4 MB | no: its input is 48x48 |" in lines
    assert "| broken | 112 | 0.00M | 1.00 | export failed: RuntimeError: no | | | |" in lines


def test_the_webface42m_variants_are_measured_once_with_their_base_network():
    twins = eval_twins(["vit_t", "vit_t_dp005_mask0", "vit_b", "vit_b_dp005_mask_005", "r18", "iresnet18"])
    assert twins == {"vit_t": ["vit_t_dp005_mask0"], "vit_b": ["vit_b_dp005_mask_005"], "r18": [], "iresnet18": []}
