"""mamikit: multi-modal, multi-task meme classification for SemEval-2022 Task 5 (MAMI).

Reproduces the "Codec" system: frozen CLIP / DETR / BERT backbones (section
3.1), shared or per-modality transformer encoders (3.2), a class-query
transformer decoder and MLP heads (3.3), trained on several datasets at once
(3.4) with auxiliary losses (3.5).

The public names below are what the notebooks use; they are imported on first
use so that `import mamikit` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    # data (section 4, table 1)
    "Task": "registry", "load_tasks": "registry", "official_tasks": "registry", "primary_dataset": "registry",
    "dataset_labels": "registry", "load_datasets": "data", "check": "data",
    "generate_synthetic": ("synthetic", "generate"), "ensure_synthetic": ("synthetic", "ensure"), "ensure_synthetic_single": ("synthetic", "ensure_single"),
    "unpack_mami": "archives", "unpack_fbhm": "archives", "ask_password": "archives",
    # scores (section 4)
    "score_a": "metrics", "score_b": "metrics", "score_files": "metrics", "write_answer": "metrics",
    # backbones and the feature store (section 3.1)
    "Profile": "profiles", "get_profile": "profiles", "list_profiles": "profiles",
    "extract": "extraction", "FeatureStore": "store", "SplitFeatures": "store",
    "clip_crops": "backbones", "detr_object_mask": "backbones",
    "load_clip": "backbones", "load_detr": "backbones", "load_text": "backbones",
    # model and losses (sections 3.2-3.5)
    "ModelConfig": "model", "MamiModel": "model", "Batch": "model",
    "projection_alignment_loss": "losses", "contrastive_embedding_loss": "losses", "dataset_loss": "losses",
    # experiments and training (sections 4-5)
    "Experiment": "experiments", "PAPER_EXPERIMENTS": "experiments", "ROUNDS": "experiments",
    "FUTURE_EXPERIMENTS": "experiments", "EXPERIMENTS": "experiments", "ROUND_TABLES": "experiments",
    "get_experiment": "experiments", "run_round": "rounds", "run_experiment": "rounds", "round_status": "rounds",
    "TrainConfig": "settings", "train_experiment": ("train", "train"), "load_run": "runs",
    "predict_split": "evaluation",
    # analysis and figures (section 5)
    "read_logs": "analysis", "experiment_table": "analysis", "evaluation_scores": "analysis", "tukey": "analysis",
    "write_report": "analysis", "pick_figure_run": "analysis", "figures_for_run": "analysis",
    "read_curves": "curves", "plot_curves": "curves", "styled_table": "curves",
    "plot_tsne": "viz", "plot_self_attention": "viz", "plot_cross_attention": "viz", "plot_samples": "viz",
    "predict_meme": "predict", "make_submission": "submission", "score_submission": "submission",
    "score_answers": "submission",
    "meme_browser": "widgets", "store_summary": "widgets", "results_explorer": "widgets", "figure_explorer": "widgets",
    "prediction_panel": "widgets",
    "run_notebooks": "notebooks", "data_overview": "notebooks", "label_prevalence": "notebooks",
    "example_memes": "notebooks",
    "show_files": "notebooks", "tensorboard": "notebooks",
    # one settings source for the notebooks and the CLI
    "Settings": "settings", "load_settings": "settings", "settings_fields": "settings",
    # Colab: the set-up notebook's settings file on Drive, and what the runtime has
    "COLAB_SETTINGS": "colab", "on_colab": "colab", "colab_setup": "settings", "runtime_report": "colab",
    "installed": "colab", "require_datasets": "data",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    try:
        target = _API[name]
    except KeyError:
        raise AttributeError(f"module 'mamikit' has no attribute {name!r}") from None
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
