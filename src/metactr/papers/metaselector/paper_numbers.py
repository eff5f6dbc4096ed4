"""The MetaSelector paper's published numbers (WWW'20), typed in from the paper text."""

# The paper's Table 3 (MovieLens-1M column) and Table 1 (ML-1M row).
PAPER_ML1M = {
    "lr": (0.7914, 0.55112, -1.45),
    "fm": (0.7928, 0.54917, -0.98),
    "ffm": (0.7936, 0.54826, -0.71),
    "deepfm": (0.7957, 0.54672, 0.00),
    "perfect_sample": (0.9008, 0.41079, 35.54),
    "perfect_user": (0.8187, 0.51829, 7.78),
    "sample_selector": (0.7963, 0.54482, 0.20),
    "metaselector": (0.8047, 0.53531, 3.04),
    "metaselector_simplified": (0.8036, 0.53550, 2.67),
}
PAPER_SHARE_ML1M = {"lr": 21.37, "fm": 18.49, "ffm": 20.11, "deepfm": 40.03}
