"""The main job on the embedded demo: its data (real medical images shipped by pydicom-data,
pydicom and scikit-image) and the orchestration of stages 1-3, router, upcycling and scoring."""
