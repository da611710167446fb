"""`python -m converter.synthetic`: write a synthetic DeepLab-v2 prototxt + caffemodel (see weights.py)."""

from converter.synthetic.weights import main

raise SystemExit(main())
