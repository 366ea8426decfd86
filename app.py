"""Serve the Quant Workbench app: ``python app.py [--host 127.0.0.1] [--port 7860] [--model smollm2-135m]``."""
import sys

from workbench.ui.app import main

if __name__ == "__main__":
    sys.exit(main())
