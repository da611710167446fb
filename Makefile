# caffe2torch: every target only calls the project's own entry points.
# `make <target> PYTHON=python3` skips the virtualenv and uses that interpreter as is
# (the GPU machine has no network and cannot build one).

BOOTSTRAP_PYTHON ?= python3
# pyproject extras the venv gets; CI adds crf,onnx,tensorboard so the tests of those extras run too.
EXTRAS ?= test
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  PY := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
else
  PY := $(PYTHON)
  SETUP :=
endif
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# Conversion (issue: convert the DeepLab-v2 Caffe models).
CAFFEMODEL ?= data/train_iter_20000.caffemodel
PROTOTXT ?=
OUT ?= build/checkpoints/$(basename $(notdir $(CAFFEMODEL)))
SURGERY ?= auto
CLASSES ?= 21

# Parity (issue: prove parity layer by layer).
CHECKPOINT ?= build/demo/voc12
REFERENCE ?=
IMAGE ?=
DEVICE ?= cpu

DEMO := build/demo
DEMO_CONFIG ?= resnet101
DEMO_TRAIN_ITER := 40

.PHONY: help setup convert demo test test-all verify-parity reference-opencv bench-convert bench-verify caffe-image caffe-blobs bench-onnx clean fuzz \
	build-net inspect bench-registry \
	eval predict bench-eval train demo-data bench-train

help:
	@echo "make demo                 whole pipeline on synthetic DeepLab-v2 caffemodels (creates .venv)"
	@echo "make test                 the test suite"
	@echo "make convert CAFFEMODEL=... [PROTOTXT=...] OUT=<folder> [SURGERY=auto|off] [CLASSES=21]"
	@echo "make verify-parity CHECKPOINT=<folder> [REFERENCE=ref.h5] [PROTOTXT=... CAFFEMODEL=...] [IMAGE=...] [REPORT_DIR=...] [DEVICE=cpu|cuda]"
	@echo "make verify-parity PROTOTXT=... CAFFEMODEL=... REFERENCE=ref.h5 [REPORT_DIR=...]   (any net, via the layer registry)"
	@echo "make build-net PROTOTXT=... CAFFEMODEL=... OUT=<folder> [ARGS='--define N=V --input-shape ...'] | make inspect PROTOTXT=..."
	@echo "make verify-parity ONNX=model.onnx REFERENCE=ref.h5 [REPORT_DIR=...] [CHECKPOINT=<source folder>]"
	@echo "make bench-convert | bench-verify | bench-onnx | caffe-image | caffe-blobs"
	@echo "make fuzz N=100000 [KIND=hdf5] [FUZZ_MIN=10000]  fuzz every bad-input path; crashes kept in fuzz/regressions"
	@echo "make eval CHECKPOINT=<folder> DATA=<root> LIST=<list> OUT=<folder> [DEVICE=auto] [ARGS='--flip --crf ...']"
	@echo "make eval PREDICTIONS=<folder of <id>.png> DATA=... LIST=... OUT=...   (score saved label PNGs)"
	@echo "make predict IMAGES='<files or folders>' CHECKPOINT=<folder> OUT=<folder>"
	@echo "make bench-eval [BENCH_CONFIG=resnet101|tiny] [ARGS='--sizes 321 513 ...']"
	@echo "make train [CHECKPOINT=<folder>] DATA=<root> LIST=<list> OUT=<folder> [SOLVER=...] [TRAIN_NET=...] [MAX_ITER=...] [DEVICE=auto] [ARGS='--define EXP=voc12 ...']"
	@echo "make demo-data OUT=<folder>     a small synthetic VOC-layout dataset"
	@echo "make bench-train [BENCH_CONFIG=resnet101|tiny] [ARGS='--updates 5 ...']"

setup: $(SETUP)

$(VENV)/.installed: pyproject.toml
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

convert: $(SETUP)
	$(PY) -m converter convert --caffemodel "$(CAFFEMODEL)" $(if $(PROTOTXT),--prototxt "$(PROTOTXT)") \
		--out "$(OUT)" --surgery $(SURGERY) --classes $(CLASSES)

# The whole pipeline on synthetic DeepLab-v2 caffemodels in the real Caffe format
# (full ResNet-101 size by default; DEMO_CONFIG=tiny for a quick run). Each stage must pass.
demo: $(SETUP)
	@echo "== demo 1/3: synthetic DeepLab-v2 caffemodels ($(DEMO_CONFIG))"
	$(PY) -m converter.synthetic --kind msc_test --config $(DEMO_CONFIG) --seed 0 --out $(DEMO)/caffe
	$(PY) -m converter.synthetic --kind init --config $(DEMO_CONFIG) --seed 0 --out $(DEMO)/caffe
	@echo "== demo 2/3: convert train_iter_20000 (VOC, 21 classes) and init (COCO head -> surgery)"
	$(PY) -m converter convert --caffemodel $(DEMO)/caffe/train_iter_20000.caffemodel \
		--prototxt $(DEMO)/caffe/test.prototxt --out $(DEMO)/voc12
	$(PY) -m converter convert --caffemodel $(DEMO)/caffe/init.caffemodel --out $(DEMO)/init --surgery auto --classes 21
	@echo "== demo 3/3: verify parity against the OpenCV oracle"
	$(PY) -m verify --checkpoint $(DEMO)/voc12
	$(PY) -m verify --checkpoint $(DEMO)/init
	@echo "== demo training: tiny init (no near-eps BatchNorm channels) converted with surgery, verified, trained $(DEMO_TRAIN_ITER) updates on synthetic data"
	$(PY) -m converter.synthetic --kind init --config tiny --no-near-eps --seed 0 --out $(DEMO)/caffe_tiny
	$(PY) -m converter convert --caffemodel $(DEMO)/caffe_tiny/init.caffemodel --out $(DEMO)/init_tiny --surgery auto --classes 21
	$(PY) -m verify --checkpoint $(DEMO)/init_tiny
	$(PY) -m segmentation demo-data --out $(DEMO)/data
	$(PY) -m segmentation train --checkpoint $(DEMO)/init_tiny --data $(DEMO)/data --list $(DEMO)/data/list/train.txt \
		--out $(DEMO)/train --max-iter $(DEMO_TRAIN_ITER) --crop-size 129 --device cpu --threads 1
	@echo "== demo evaluation: the untrained tiny init, then the trained snapshot, on the synthetic val split (pad 513)"
	$(PY) -m segmentation eval --checkpoint $(DEMO)/init_tiny --data $(DEMO)/data --list $(DEMO)/data/list/val.txt \
		--out $(DEMO)/eval_init --device cpu --threads 1 --quiet
	$(PY) -m segmentation eval --checkpoint $(DEMO)/train/iter_$(DEMO_TRAIN_ITER) --data $(DEMO)/data \
		--list $(DEMO)/data/list/val.txt --out $(DEMO)/eval --save-predictions $(DEMO)/eval/predictions --device cpu --threads 1
	$(PY) -m segmentation predict $(foreach i,00000 00001 00002,$(DEMO)/data/JPEGImages/val_$(i).jpg) \
		--checkpoint $(DEMO)/train/iter_$(DEMO_TRAIN_ITER) --out $(DEMO)/eval/overlays --device cpu --threads 1
	@echo "== demo passed: checkpoints in $(DEMO)/voc12 and $(DEMO)/init, parity reports in their parity/ folders, trained snapshot $(DEMO)/train/iter_$(DEMO_TRAIN_ITER), its evaluation $(DEMO)/eval/report.md and overlays in $(DEMO)/eval/overlays"

# Without CHECKPOINT, PROTOTXT + CAFFEMODEL + REFERENCE verify any supported net built in memory by the
# layer registry (report in REPORT_DIR, default build/parity/<net name>/; nothing recorded).
verify-parity: VERIFY_NO_CHECKPOINT = $(and $(filter-out command line environment,$(origin CHECKPOINT)),$(PROTOTXT),$(filter command line environment,$(origin CAFFEMODEL)),$(REFERENCE))
verify-parity: $(SETUP)
ifneq ($(ONNX),)
	$(PY) -m verify --onnx "$(ONNX)" $(if $(REFERENCE),--reference "$(REFERENCE)") $(if $(REPORT_DIR),--report-dir "$(REPORT_DIR)") \
		$(if $(filter command line environment,$(origin CHECKPOINT)),--checkpoint "$(CHECKPOINT)")
else
	$(PY) -m verify $(if $(VERIFY_NO_CHECKPOINT),,--checkpoint "$(CHECKPOINT)") $(if $(PROTOTXT),--prototxt "$(PROTOTXT)") \
		$(if $(filter command line environment,$(origin CAFFEMODEL)),--caffemodel "$(CAFFEMODEL)") \
		$(if $(REFERENCE),--reference "$(REFERENCE)") $(if $(IMAGE),--image "$(IMAGE)") \
		$(if $(REPORT_DIR),--report-dir "$(REPORT_DIR)") $(if $(ALLOW_PARTIAL),--allow-partial) --device $(DEVICE)
endif

bench-convert: $(SETUP)
	$(PY) -m benchmarks.bench_convert --config resnet101 --workdir build/bench

bench-verify: $(SETUP)
	$(PY) -m benchmarks.bench_verify --config resnet101

# Any supported Caffe net through the layer registry (issue 7): a checkpoint folder, the per-layer table,
# and the built DeepLab module's speed against the hand-written model (BENCH_CONFIG=tiny for a quick run).
build-net: NET_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),build/nets/$(basename $(notdir $(PROTOTXT))))
build-net: $(SETUP)
	$(PY) -m converter build --prototxt "$(PROTOTXT)" --caffemodel "$(CAFFEMODEL)" --out "$(NET_OUT)" $(ARGS)

inspect: $(SETUP)
	$(PY) -m converter inspect "$(PROTOTXT)" $(if $(filter command line environment,$(origin CAFFEMODEL)),--caffemodel "$(CAFFEMODEL)") $(ARGS)

bench-registry: BENCH_CONFIG ?= resnet101
bench-registry: $(SETUP)
	$(PY) -m benchmarks.bench_registry --config $(BENCH_CONFIG)

# ONNX export (issue 8): onnxruntime on the exported net vs this project's PyTorch forward vs OpenCV dnn
# on the Caffe net, images/s at 321 (BENCH_CONFIG=tiny for a quick run).
bench-onnx: BENCH_CONFIG ?= resnet101
bench-onnx: $(SETUP)
	$(PY) -m benchmarks.bench_onnx --config $(BENCH_CONFIG)

# Evaluation and prediction (issue 10): python -m segmentation eval|predict; ARGS='<more options>' (see --help).
# OUT and DEVICE get their own defaults here (build/eval or build/predict; auto = CUDA when available).
eval: DATA ?= $(DEMO)/data
eval: LIST ?= $(DATA)/list/val.txt
eval: EVAL_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),build/eval)
eval: EVAL_DEVICE = $(if $(filter command line environment,$(origin DEVICE)),$(DEVICE),auto)
eval: $(SETUP)
	$(PY) -m segmentation eval $(if $(PREDICTIONS),--predictions "$(PREDICTIONS)",--checkpoint "$(CHECKPOINT)" \
		--device $(EVAL_DEVICE)) --data "$(DATA)" --list "$(LIST)" --out "$(EVAL_OUT)" $(ARGS)

predict: PREDICT_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),build/predict)
predict: PREDICT_DEVICE = $(if $(filter command line environment,$(origin DEVICE)),$(DEVICE),auto)
predict: $(SETUP)
	@test -n "$(IMAGES)" || { echo "predict needs IMAGES=<image files or folders>"; exit 2; }
	$(PY) -m segmentation predict $(IMAGES) --checkpoint "$(CHECKPOINT)" --out "$(PREDICT_OUT)" \
		--device $(PREDICT_DEVICE) $(ARGS)

bench-eval: BENCH_CONFIG ?= resnet101
bench-eval: $(SETUP)
	$(PY) -m benchmarks.bench_eval --config $(BENCH_CONFIG) $(ARGS)

# Training (issue 9): python -m segmentation train; ARGS='<more options>' (see --help).
# Per-target defaults: CHECKPOINT the converted init (make convert CAFFEMODEL=data/init.caffemodel),
# DATA the demo dataset, OUT build/train, DEVICE auto (CUDA when available).
train: TRAIN_CHECKPOINT = $(if $(filter command line environment,$(origin CHECKPOINT)),$(CHECKPOINT),build/checkpoints/init)
train: DATA ?= $(DEMO)/data
train: LIST ?= $(DATA)/list/train.txt
train: TRAIN_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),build/train)
train: TRAIN_DEVICE = $(if $(filter command line environment,$(origin DEVICE)),$(DEVICE),auto)
train: $(SETUP)
	$(PY) -m segmentation train --checkpoint "$(TRAIN_CHECKPOINT)" --data "$(DATA)" --list "$(LIST)" \
		--out "$(TRAIN_OUT)" --device $(TRAIN_DEVICE) $(if $(SOLVER),--solver "$(SOLVER)") \
		$(if $(TRAIN_NET),--train-net "$(TRAIN_NET)") $(if $(MAX_ITER),--max-iter $(MAX_ITER)) $(ARGS)

demo-data: DEMO_DATA_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),$(DEMO)/data)
demo-data: $(SETUP)
	$(PY) -m segmentation demo-data --out "$(DEMO_DATA_OUT)" $(ARGS)

# (a) the earlier port's configuration vs (b) the trainer's fast defaults; CUDA: ResNet-101, CPU: tiny.
bench-train: $(SETUP)
	$(PY) -m benchmarks.bench_train $(if $(filter command line environment,$(origin BENCH_CONFIG)),--config $(BENCH_CONFIG)) $(ARGS)

# Fuzz harness (issue 6): N cases in all, split over the input kinds (at least FUZZ_MIN each);
# KIND=<kind> for one kind; crashes are minimised into fuzz/regressions/. Exit 1 on any crash.
fuzz: N ?= 600
fuzz: FUZZ_MIN ?= 0
fuzz: FUZZ_SEED ?= 0
fuzz: $(SETUP)
	$(PY) -m fuzz --cases $(N) --min-per-kind $(FUZZ_MIN) --seed $(FUZZ_SEED) $(foreach k,$(KIND),--kind $(k)) \
		--keep-crashes --report build/fuzz/report.json

test: $(SETUP)
	$(PY) -m pytest -q

test-all: $(SETUP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf build

# Reference from the real deeplab-v2 Caffe in Docker (docs/caffe_docker.md).
CAFFE_DEVICE ?= gpu
CAFFE_IMAGE := deeplab-v2-caffe$(if $(filter cpu,$(CAFFE_DEVICE)),:cpu)
INPUT ?= synthetic:321x321
REFERENCE_OUT ?= build/reference/caffe.h5
BLOBS ?=

caffe-image:
	$(if $(filter-out gpu cpu,$(CAFFE_DEVICE)),$(error CAFFE_DEVICE must be gpu or cpu))
	docker build -t $(CAFFE_IMAGE) $(if $(filter cpu,$(CAFFE_DEVICE)),--build-arg CPU_ONLY=1) caffe_docker

caffe-blobs:
	$(if $(filter-out gpu cpu,$(CAFFE_DEVICE)),$(error CAFFE_DEVICE must be gpu or cpu))
	@test -n "$(PROTOTXT)" || { echo "caffe-blobs needs PROTOTXT=<net.prototxt inside the checkout>"; exit 2; }
	mkdir -p "$(dir $(REFERENCE_OUT))"
	docker run --rm $(if $(filter gpu,$(CAFFE_DEVICE)),--gpus all) -u "$$(id -u):$$(id -g)" -e HOME=/tmp \
		-v "$(CURDIR)":/work -w /work $(CAFFE_IMAGE) \
		python2 /work/caffe_docker/export_blobs.py --prototxt "$(PROTOTXT)" --caffemodel "$(CAFFEMODEL)" \
		--input "$(INPUT)" --out "$(REFERENCE_OUT)" $(if $(BLOBS),--blobs "$(BLOBS)") \
		$(if $(filter gpu,$(CAFFE_DEVICE)),--gpu 0)

# Reference from OpenCV 4.x dnn (the oracle CI and the demo use).
OPENCV_REFERENCE ?= build/reference/opencv.h5
COMPRESS ?=

reference-opencv: $(SETUP)
	$(PY) -m verify.opencv_reference --prototxt "$(PROTOTXT)" $(if $(CAFFEMODEL),--caffemodel "$(CAFFEMODEL)") \
		--out "$(OPENCV_REFERENCE)" $(if $(IMAGE),--image "$(IMAGE)") $(if $(BLOBS),--blobs "$(BLOBS)") $(if $(COMPRESS),--compress)
