"""Random tiny nnU-Net experts for the tests and the library notebooks' examples (not part of the `amalgam` package):
synthetic nnU-Net v2 plans, and a seeded, randomly initialised `PlainConvUNet` built from them by nnU-Net's own
`get_network_from_plans` (through the trainer's `build_network_architecture`), as an `amalgam.experts.Expert`. No
training, no files. The notebooks import this module with `sys.path.insert(0, str(repo_root() / "tests"))`."""
from __future__ import annotations

from typing import Sequence

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from amalgam.config import AmalgamError
from amalgam.experts import Expert, _build_network


def synthetic_plans(spatial_dims: int = 3, in_channels: int = 1, modality: str = "CT",
                    features: Sequence[int] = (8, 16, 32), patch: int = 32,
                    dataset_name: str = "Dataset999_Tiny") -> dict:
    """nnU-Net v2 plans (one configuration, `2d` or `3d_fullres`) for a small PlainConvUNet; CT channels use CT
    normalisation, others z-score."""
    if spatial_dims not in (2, 3): raise AmalgamError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
    d, n = spatial_dims, len(features)
    conv, norm = ("torch.nn.modules.conv.Conv3d", "torch.nn.modules.instancenorm.InstanceNorm3d") if d == 3 else \
                 ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.instancenorm.InstanceNorm2d")
    ct = modality.upper() == "CT"
    configuration = {
        "data_identifier": f"nnUNetPlans_{'3d_fullres' if d == 3 else '2d'}",
        "preprocessor_name": "DefaultPreprocessor", "batch_size": 2, "patch_size": [patch] * d,
        "median_image_size_in_voxels": [float(patch)] * d, "spacing": [1.0] * d,
        "normalization_schemes": ["CTNormalization" if ct else "ZScoreNormalization"] * in_channels,
        "use_mask_for_norm": [False] * in_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
                "kernel_sizes": [[3] * d] * n, "strides": [[1] * d] + [[2] * d] * (n - 1), "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True, "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    # CT statistics of a soft-tissue-like foreground, so clipping to [-100, 300] HU is visible in examples
    ct_props = {"max": 1000.0, "mean": 100.0, "median": 90.0, "min": -1000.0, "percentile_00_5": -100.0,
                "percentile_99_5": 300.0, "std": 50.0}
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": [patch] * 3,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres" if d == 3 else "2d": configuration},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {str(c): dict(ct_props) for c in range(in_channels)}}


def tiny_test_expert(spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3, name: str = "expert",
                     modality: str = "CT", seed: int = 0, features: Sequence[int] = (8, 16, 32),
                     patch: int = 32) -> Expert:
    """A random-init (seeded) nnU-Net PlainConvUNet expert built from synthetic plans: for fast tests, no training.
    `features` per stage (default tiny; `NNUNET_DEFAULT_FEATURES[spatial_dims]` for a full-size nnU-Net network),
    `patch` its plans' patch edge."""
    if num_classes < 2:
        raise AmalgamError(f"num_classes: an expert segments background plus at least one class, got {num_classes}")
    plans = synthetic_plans(spatial_dims, in_channels, modality, features=features, patch=patch)
    dataset_json = {"channel_names": {str(c): modality for c in range(in_channels)},
                    "labels": {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}},
                    "numTraining": 0, "file_ending": ".nii.gz", "amalgam_task": name}
    pm = PlansManager(plans)
    configuration = next(iter(plans["configurations"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _build_network(pm, pm.get_configuration(configuration), dataset_json)
    return Expert(network, plans, dataset_json, configuration, name=name)
