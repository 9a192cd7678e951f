"""Make the lab's modules (lab/*.py, imported by netloom_lab.py as top-level modules) importable."""
import pathlib
import sys

LAB_DIR = pathlib.Path(__file__).resolve().parents[2] / "lab"
sys.path.insert(0, str(LAB_DIR))
