"""The backbone profile registry (mamikit/profiles.json): tiny variants that build offline and extract with the
widths their models report, detector none, stores of several profiles side by side, experiments naming a profile."""

import io
import json
import os
from contextlib import redirect_stdout

import pytest

import mamikit as mk
from mamikit import profiles as P
from mamikit.backbones import describe
from mamikit.cli import main
from mamikit.experiments import get_experiment
from mamikit.extraction import extract, extract_frames
from mamikit.runs import recorded_values
from mamikit.settings import TRAINING_PRESETS, Settings
from mamikit.store import FeatureStore, store_dir
from mamikit.train import TrainConfig, run_settings, train
from mamikit.utils import MamikitError

TINY = [n for n in P.profile_names() if P.is_tiny(n)]
FULL = [n for n in P.profile_names() if not P.is_tiny(n)]
slow = pytest.mark.skipif(os.environ.get("MAMIKIT_SLOW") != "1",
                          reason="builds every full-size profile (ViT-L-14, ...) at random; set MAMIKIT_SLOW=1")


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    """Three synthetic MAMI test memes, as extraction reads them."""
    from mamikit.data import load_datasets
    from mamikit.synthetic import generate

    root = tmp_path_factory.mktemp("memes")
    generate(root, seed=5, n_mami=10, n_mami_test=3, n_fbhm=0, progress=False)
    test = load_datasets(root, datasets=["MAMI"])["MAMI"].splits["test"]
    return {"MAMI": {"test": test.head(3)}}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A synthetic MAMI set just large enough to train one epoch on."""
    from mamikit.synthetic import generate

    root = tmp_path_factory.mktemp("small-data")
    generate(root, seed=7, n_mami=30, n_mami_test=6, n_fbhm=0, progress=False)
    return root


# ----------------------------------------------------------------------------- the registry


def test_the_registry_is_valid_and_every_full_profile_names_its_tiny_variant():
    data = P.registry()
    assert set(FULL) >= {"paper", "vit-l-14", "siglip", "no-detr"} and "demo" in TINY
    for name in FULL:
        tiny = P.tiny_variant(name)
        assert P.is_tiny(tiny) and P.full_variant(tiny) == name and P.tiny_variant(tiny) == tiny
    assert P.tiny_variant("paper") == "demo"
    for name in P.profile_names():
        profile = P.get_profile(name)
        assert profile.name == name and profile.has_detector == (data["profiles"][name]["detr_model"] is not None)
        if P.is_tiny(name):  # every tiny backbone is a tiny architecture of the registry (or the demo's MiniLM)
            assert P.tiny_model_config("clip", profile.clip_model) is not None
            assert profile.detr_model is None or P.tiny_model_config("detr", profile.detr_model) is not None
    # the SigLIP profile names an architecture and tag open_clip really has
    import open_clip

    siglip = P.get_profile("siglip")
    assert "SigLIP" in siglip.clip_model and (siglip.clip_model, siglip.clip_pretrained) in open_clip.list_pretrained()
    assert P.get_profile("vit-l-14").clip_model == "ViT-L-14" and P.get_profile("no-detr").detr_model is None


def test_paper_and_demo_keep_their_values():
    assert P.get_profile("paper") == P.Profile(
        name="paper", clip_model="RN50x4", clip_pretrained="openai", detr_model="facebook/detr-resnet-50",
        text_model="Hate-speech-CNERG/bert-base-uncased-hatexplain", max_text_tokens=121)
    assert P.get_profile("demo") == P.Profile(
        name="demo", clip_model="mamikit-tiny-vit", clip_pretrained=None, detr_model="mamikit-tiny-detr",
        text_model=P.minilm_dir(), encoder_layers=2, decoder_layers=2, ffn_dim=512)
    assert P.get_profile("paper", weights="random", max_text_tokens=None).weights == "random"


def test_unknown_names_and_broken_registries_are_refused_with_the_registered_names(tmp_path):
    with pytest.raises(MamikitError, match="unknown profile 'nope'; registered: paper, demo, vit-l-14"):
        P.get_profile("nope")
    with pytest.raises(MamikitError, match="unknown profile 'nope'"):
        get_experiment("10", profile="nope")
    broken = json.loads(P.REGISTRY_FILE.read_text())
    del broken["profiles"]["vit-l-14"]["tiny"]
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(MamikitError, match="profile vit-l-14: give either \"tiny\""):
        P.registry(path)
    broken["profiles"]["vit-l-14"].update(tiny="demo-vit-l-14", clip_width=1024)
    path.write_text(json.dumps(broken))
    with pytest.raises(MamikitError, match="unknown key 'clip_width'"):
        P.registry(path)


def test_list_profiles_and_the_cli_show_every_profile():
    table = mk.list_profiles()
    assert list(table["profile"]) == list(P.profile_names())
    assert {"image model", "detector", "text model", "tiny variant"} <= set(table.columns)
    row = table.set_index("profile").loc["vit-l-14"]
    assert (row["image model"], row["detector"], row["tiny variant"]) == (
        "ViT-L-14/openai", "facebook/detr-resnet-50", "demo-vit-l-14")
    assert table.set_index("profile").loc["no-detr", "detector"] == "none"
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["profiles"]) == 0
    lines = out.getvalue().splitlines()
    assert all(any(line.split()[0] == name for line in lines[1:]) for name in P.profile_names())
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["profiles", "--describe", "demo-no-detr"]) == 0
    assert out.getvalue().startswith("demo-no-detr: clip 96 (") and "detr none" in out.getvalue()


def test_an_experiment_profile_maps_to_the_tiny_variant_under_a_tiny_run_profile():
    demo, paper = P.get_profile("demo", weights="random", init_seed=3), P.get_profile("paper")
    assert P.for_experiment(demo, None) is demo and P.for_experiment(demo, "paper") is demo
    mapped = P.for_experiment(demo, "vit-l-14")
    assert (mapped.name, mapped.weights, mapped.init_seed) == ("demo-vit-l-14", "random", 3)
    assert P.for_experiment(paper, "vit-l-14").name == "vit-l-14"
    assert P.for_experiment(demo, "demo-siglip").name == "demo-siglip"


def test_tiny_profiles_train_with_the_demo_preset_and_full_ones_with_the_paper_preset(tmp_path):
    assert Settings(profile="demo-siglip", run_root=str(tmp_path)).train == TRAINING_PRESETS["demo"]
    assert Settings(profile="vit-l-14", run_root=str(tmp_path)).train == TRAINING_PRESETS["paper"]
    assert Settings(profile="demo-vit-l-14", run_root=str(tmp_path)).changed_training() == {}


# ----------------------------------------------------------------------------- building and extracting


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_profile_builds_offline_and_extracts_with_the_widths_its_models_report(name, memes, tmp_path):
    widths = describe(name, weights="random")
    assert all(info is None or (info["dim"] > 0 and info["params"] > 0) for info in widths.values())
    summary = extract_frames(memes, tmp_path / name, P.get_profile(name, weights="random"), batch_size=2,
                             device="cpu", progress=False, workers=1)
    store = FeatureStore(summary["store"])
    built = {k: v["dim"] for k, v in widths.items() if v is not None}
    assert store.dims == built and store.profile_name == name
    assert store.manifest["backbones"]["text"]["weights"] == "random (seed 0)"
    features = store.load("MAMI", "test")
    assert len(features) == 3 and features.clip.shape == (3, 5, built["clip"])
    assert features.text_hidden.shape[1] == built["text"]
    if "detr" in built:
        assert features.detr.shape == (3, 100, built["detr"]) and store.has_detector
    else:
        assert features.detr is None and not store.has_detector and store.manifest["detector"] == "none"


def test_tiny_variants_differ_where_their_full_profiles_differ():
    dims = {n: describe(n) for n in ("demo", "demo-vit-l-14", "demo-siglip")}
    assert dims["demo"]["clip"]["dim"] != dims["demo-vit-l-14"]["clip"]["dim"]  # another ViT, widths read off it
    assert dims["demo-siglip"]["detr"]["dim"] != dims["demo"]["detr"]["dim"]
    assert dims["demo-siglip"]["text"]["model"] == "mamikit-tiny-roberta"


def test_a_tiny_roberta_keeps_the_wordpiece_vocabulary_and_its_padding_id():
    from mamikit.backbones import load_text

    text = load_text(P.get_profile("demo-siglip"), "cpu")
    assert type(text.model).__name__ == "RobertaModel" and text.tokenizer.vocab_size == 30522
    assert text.model.config.vocab_size == 30522 and text.model.config.pad_token_id == text.tokenizer.pad_token_id
    ids, mask, hidden = text.encode(["Short", "a longer meme text"])
    assert hidden.shape == (2, ids.shape[1], 128) and not mask[0].all()


# ----------------------------------------------------------------------------- detector none


def test_detector_none_stores_no_detr_and_training_with_detr_is_refused(small_data, tmp_path):
    root = tmp_path / "features"
    extract(small_data, store_dir(root, "demo-no-detr"), "demo-no-detr", backbones="detr,text,clip",
            device="cpu", progress=False, datasets=["MAMI"], workers=1)
    store = FeatureStore(root / "demo-no-detr")
    assert set(store.dims) == {"clip", "text"} and store.manifest["detector"] == "none"
    with pytest.raises(MamikitError, match="extracted with detector none; profile demo has a DETR"):
        extract(small_data, root / "demo-no-detr", "demo", device="cpu", progress=False, datasets=["MAMI"])
    with pytest.raises(MamikitError, match="detector none: there are no DETR features"):
        extract(small_data, tmp_path / "other", "demo-no-detr", backbones="detr", device="cpu", progress=False)
    cfg = TrainConfig(epochs=1, evals_per_epoch=1, batch_size=8, accumulation=1, device="cpu")
    with pytest.raises(MamikitError, match="holds no DETR features \\(detector none\\); experiment 10 uses DETR"):
        train("10", small_data, root, tmp_path / "run10", profile="demo-no-detr", train_cfg=cfg, progress=False)
    with pytest.raises(MamikitError, match="has detector none: there is no DETR to load"):
        from mamikit.backbones import load_detr

        load_detr(P.get_profile("demo-no-detr"), "cpu")


# ----------------------------------------------------------------------------- stores side by side


def test_store_dir_puts_profiles_side_by_side_unless_the_root_holds_a_store(tmp_path):
    root = tmp_path / "features"
    assert store_dir(root, "demo") == root / "demo" and store_dir(root, "vit-l-14") == root / "vit-l-14"
    settings = Settings(run_root=str(tmp_path / "run"))
    assert settings.store_dir() == tmp_path / "run" / "features" / "demo"
    assert settings.store_dir("demo-siglip") == tmp_path / "run" / "features" / "demo-siglip"
    root.mkdir()
    (root / "manifest.json").write_text("{}")  # a store written there directly (the layout before profiles)
    assert store_dir(root, "demo") == root and store_dir(root, "vit-l-14") == root
    assert Settings(features_root=str(root)).store_dir() == root


def test_a_run_naming_a_profile_trains_from_that_profiles_tiny_store_and_records_it(small_data, tmp_path):
    root = tmp_path / "features"
    extract(small_data, store_dir(root, "demo-vit-l-14"), "demo-vit-l-14", device="cpu", progress=False,
            datasets=["MAMI"], workers=1)
    experiment = get_experiment("10", profile="vit-l-14")
    assert experiment.display()["Profile"] == "vit-l-14" and get_experiment("10").display()["Profile"] == ""
    cfg = TrainConfig(epochs=1, evals_per_epoch=1, batch_size=8, accumulation=1, device="cpu")
    out = train(experiment, small_data, root, tmp_path / "run", profile="demo", train_cfg=cfg, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["profile"]["name"] == "demo-vit-l-14" and config["experiment"]["profile"] == "vit-l-14"
    assert config["features"] == str((root / "demo-vit-l-14").resolve())
    assert config["profile"] == run_settings(experiment, P.get_profile("demo"), cfg)["profile"]
    assert run_settings(get_experiment("10"), P.get_profile("demo"), cfg)["profile"]["name"] == "demo"
    loaded = mk.load_run(out, device="cpu", features_root=root)  # the features root: its profile's store is found
    assert loaded.model.cfg.clip_dim == describe("demo-vit-l-14")["clip"]["dim"]
    # a store written at the root itself is the one every profile reads: another profile's run is refused
    with pytest.raises(MamikitError, match="built with the demo-vit-l-14 profile; this run asks for the demo pro"):
        train("10", small_data, root / "demo-vit-l-14", tmp_path / "run2", profile="demo", train_cfg=cfg,
              progress=False)


def test_runs_recorded_before_experiments_named_a_profile_read_as_the_runs_own():
    recorded = {"name": "10", "query_align": False}
    assert recorded_values("experiment", recorded)["profile"] is None
    assert recorded_values("experiment", dict(recorded, profile="vit-l-14"))["profile"] == "vit-l-14"


# ----------------------------------------------------------------------------- full size


@slow
def test_every_full_profile_builds_at_random_with_the_widths_of_its_architectures():
    expected_clip = {"paper": 640, "vit-l-14": 768, "siglip": 768, "no-detr": 640}  # open_clip's embed_dim
    for name in FULL:
        widths = describe(name, weights="random")
        assert widths["clip"]["dim"] == expected_clip[name]
        assert widths["text"]["dim"] == 768
        assert (widths["detr"] is None) == (name == "no-detr")
        if widths["detr"] is not None:
            assert widths["detr"]["dim"] == 256
