#!/usr/bin/env python
"""Run a Caffe net in pycaffe and write every top blob to a reference-activations HDF5 file.

It runs inside the deeplab-v2 Caffe image under the fork's Python 2.7, and under
Python 3 for the project's tests, so it keeps to syntax both understand and
depends only on numpy, h5py and (inside main() alone) caffe.

File layout (docs/caffe_docker.md, the project's reference-activations format):
  root attributes  format="caffe-activations", version=1, producer, prototxt
  /inputs/<blob>   float32 N,C,H,W, each input fed to the net
  /blobs/<blob>    float32, each layer top's value when the forward pass ends;
                   attribute `order` lists the blob names (Caffe's spelling)
                   in the order the layers first produced them
  HDF5 keys keep Caffe's spelling with '%' written '%25' and '/' written '%2F'.
"""
from __future__ import absolute_import, division, print_function

import argparse
import io
import os
import re
import sys
from collections import OrderedDict

import h5py
import numpy as np

FORMAT = "caffe-activations"
VERSION = 1
# DeepLab's BGR mean, subtracted from synthetic images as its data layer does.
BGR_MEAN = (104.008, 116.669, 122.675)
SYNTHETIC = re.compile(r"^synthetic:(\d+)x(\d+)$")

try:
    TEXT = unicode  # noqa: F821  (Python 2)
except NameError:
    TEXT = str


class ExportError(Exception):
    """A bad input the user can fix; main() prints it on one line and exits with 2."""


def escape_name(name):
    """Caffe blob name -> HDF5 key: '%' -> '%25' first, then '/' -> '%2F'."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(key):
    """HDF5 key -> Caffe blob name (inverse of escape_name)."""
    return re.sub(r"%(25|2F)", lambda match: "%" if match.group(1) == "25" else "/", key)


def _text(value):
    """Unicode text in both Pythons, so h5py stores variable-length UTF-8 strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return TEXT(value)


def split_blob_names(net):
    """Tops of the Split layers Caffe inserts by itself where one blob feeds several layers.

    They share their source blob's data and appear in no prototxt, so they are not
    exported. Caffe names them "<split layer name>_<index>".
    """
    split_layers = set(name for name, layer in zip(net._layer_names, net.layers)
                       if layer.type == "Split")
    names = set()
    for blob in net.blobs:
        prefix, _, index = blob.rpartition("_")
        if index.isdigit() and prefix in split_layers:
            names.add(blob)
    return names


def produced_blob_names(net):
    """Layer tops in the order the layers first produced them.

    pycaffe's net.blobs follows Caffe's blob list, which Net::Init grows as each
    layer's new tops appear (an in-place top keeps the place of its first
    producer). That is the order to record: the fork's pycaffe has no top_names.
    The net's declared inputs come first there; they go to /inputs instead.
    """
    skipped = set(net.inputs) | split_blob_names(net)
    return [name for name in net.blobs if name not in skipped]


def select_blobs(names, wanted):
    """The wanted subset of `names`, in net order; every wanted name must be a layer top."""
    if not wanted:
        return list(names)
    produced = set(names)
    missing = [name for name in wanted if name not in produced]
    if missing:
        raise ExportError("--blobs names no layer of the net produces: %s" % ", ".join(missing))
    chosen = set(wanted)
    return [name for name in names if name in chosen]


def declared_input_shapes(net):
    """Net input name -> the shape its prototxt declares (before any reshape)."""
    if not net.inputs:
        raise ExportError("the net declares no inputs; declare them the old way "
                          "(`input:` + `input_shape`), the deeplab-v2 fork has no Input layer")
    return OrderedDict((name, tuple(net.blobs[name].data.shape)) for name in net.inputs)


def _checked_input(name, array, declared):
    """The array as C-contiguous float32 N,C,H,W, or an ExportError saying what does not fit."""
    array = np.asarray(array)
    if array.ndim != 4:
        raise ExportError("input '%s' must be 4-D N,C,H,W, got shape %s" % (name, array.shape))
    if array.shape[1] != declared[1]:
        raise ExportError("input '%s' has %d channels, the net declares %d"
                          % (name, array.shape[1], declared[1]))
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ExportError("input '%s' has non-numeric dtype %s" % (name, array.dtype))
    return np.ascontiguousarray(array, dtype=np.float32)


def synthetic_image(declared, height, width, seed):
    """A deterministic random BGR picture (0..255, mean subtracted) in the declared N and C."""
    num, channels = declared[0], declared[1]
    rng = np.random.RandomState(seed)
    pixels = rng.uniform(0.0, 255.0, size=(num, channels, height, width))
    if channels == len(BGR_MEAN):
        pixels -= np.asarray(BGR_MEAN).reshape(1, 3, 1, 1)
    return pixels.astype(np.float32)


def _inputs_from_reference(path, shapes):
    """The /inputs of an existing reference-activations file, by Caffe name."""
    with h5py.File(path, "r") as handle:
        kind = _text(handle.attrs.get("format", ""))
        if kind != FORMAT or int(handle.attrs.get("version", -1)) != VERSION:
            raise ExportError("%s is not a %s version %d file (format=%r, version=%r)"
                              % (path, FORMAT, VERSION, kind, handle.attrs.get("version")))
        if "inputs" not in handle:
            raise ExportError("%s has no /inputs group" % path)
        stored = dict((unescape_name(_text(key)), key) for key in handle["inputs"])
        missing = [name for name in shapes if name not in stored]
        if missing:
            raise ExportError("%s has no /inputs for net input(s): %s" % (path, ", ".join(missing)))
        return OrderedDict((name, handle["inputs"][stored[name]][...]) for name in shapes)


def load_inputs(spec, shapes, seed=0):
    """Arrays to feed, by net input name.

    `spec` is an .npy file (one-input nets), an HDF5 reference-activations file
    whose /inputs are reused, or "synthetic:HxW" (one-input nets).
    """
    match = SYNTHETIC.match(spec)
    if match is None and not os.path.isfile(spec):
        raise ExportError("input file not found: %s" % spec)
    if match is not None or spec.endswith(".npy"):
        if len(shapes) != 1:
            raise ExportError("%s feeds one blob but the net has inputs %s; "
                              "give a reference HDF5 file with all of them"
                              % (spec, ", ".join(shapes)))
        name, declared = list(shapes.items())[0]
        if match is not None:
            array = synthetic_image(declared, int(match.group(1)), int(match.group(2)), seed)
        else:
            array = np.load(spec, allow_pickle=False)
        arrays = OrderedDict([(name, array)])
    elif h5py.is_hdf5(spec):
        arrays = _inputs_from_reference(spec, shapes)
    else:
        raise ExportError("input %s is neither .npy, HDF5 nor synthetic:HxW" % spec)
    return OrderedDict((name, _checked_input(name, array, shapes[name]))
                       for name, array in arrays.items())


def feed_and_forward(net, inputs):
    """Reshape the net to the inputs, copy them in and run one forward pass."""
    for name, array in inputs.items():
        net.blobs[name].reshape(*array.shape)
    net.reshape()
    for name, array in inputs.items():
        net.blobs[name].data[...] = array
    net.forward()


def write_reference(path, net, inputs, blob_names, producer, prototxt_text):
    """Write the file atomically: a temporary file beside `path`, renamed when complete."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory)
    temporary = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        # libver "latest": a net with thousands of tops has an `order` attribute
        # over the 64 KiB an attribute may take in the default object header.
        with h5py.File(temporary, "w", libver="latest") as handle:
            handle.attrs["format"] = _text(FORMAT)
            handle.attrs["version"] = VERSION
            handle.attrs["producer"] = _text(producer)
            handle.attrs["prototxt"] = _text(prototxt_text)
            fed = handle.create_group("inputs")
            for name, array in inputs.items():
                fed.create_dataset(escape_name(name), data=array)
            blobs = handle.create_group("blobs")
            for name in blob_names:
                blobs.create_dataset(escape_name(name),
                                     data=np.asarray(net.blobs[name].data, dtype=np.float32))
            blobs.attrs.create("order", data=[_text(name) for name in blob_names],
                               dtype=h5py.special_dtype(vlen=TEXT))
        os.rename(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def export(net, inputs, out_path, producer, prototxt_text, wanted=None):
    """Forward `inputs` through a pycaffe-like net and write the reference file.

    `net` needs what pycaffe's Net offers: .blobs (OrderedDict name -> blob with
    .data and .reshape), .inputs, ._layer_names, .layers (with .type),
    .reshape() and .forward(). Returns the exported blob names in order.
    """
    names = select_blobs(produced_blob_names(net), wanted)
    feed_and_forward(net, inputs)
    write_reference(out_path, net, inputs, names, producer, prototxt_text)
    return names


def load_caffe(gpu):
    """Import pycaffe and pick the device; quiet glog unless the caller set its level."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    if gpu is not None and os.environ.get("DEEPLAB_CPU_ONLY") == "1":
        raise ExportError("--gpu given, but this image's Caffe was built with CPU_ONLY=1")
    import caffe
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_device(gpu)
        caffe.set_mode_gpu()
    return caffe


def producer_text(caffe, gpu):
    """Free text naming the fork's commit, its build, the pycaffe version and the device."""
    commit = os.environ.get("DEEPLAB_COMMIT", "unknown commit")
    build = {"1": "; CPU_ONLY build, BatchNorm x_norm_ copy removed",
             "0": "; CUDA 8.0 build, no cuDNN"}.get(os.environ.get("DEEPLAB_CPU_ONLY"), "")
    device = "cpu" if gpu is None else "gpu %d" % gpu
    return "caffe deeplab-v2 %s (pycaffe %s, %s%s)" % (
        commit, getattr(caffe, "__version__", "unknown"), device, build)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prototxt", required=True, help="net definition (TEST phase)")
    parser.add_argument("--caffemodel", required=True, help="trained weights")
    parser.add_argument("--input", required=True,
                        help="an .npy array, a reference HDF5 file whose /inputs are reused, "
                             "or synthetic:HxW")
    parser.add_argument("--out", required=True, help="HDF5 file to write")
    parser.add_argument("--blobs", default="",
                        help="comma-separated subset of blobs to write (default: all tops)")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic image")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    wanted = [name for name in args.blobs.split(",") if name]
    try:
        for path in (args.prototxt, args.caffemodel):
            if not os.path.isfile(path):
                raise ExportError("file not found: %s" % path)
        with io.open(args.prototxt, encoding="utf-8") as handle:
            prototxt_text = handle.read()
        caffe = load_caffe(args.gpu)
        net = caffe.Net(args.prototxt, args.caffemodel, caffe.TEST)
        inputs = load_inputs(args.input, declared_input_shapes(net), args.seed)
        names = export(net, inputs, args.out, producer_text(caffe, args.gpu), prototxt_text, wanted)
    except ExportError as error:
        print("error: %s" % error, file=sys.stderr)
        return 2
    except (IOError, OSError) as error:  # an unwritable --out, a full disk: one line, not a traceback
        print("error: %s: %s" % (getattr(error, "filename", None) or args.out, error.strerror or error), file=sys.stderr)
        return 2
    print("wrote %d blobs to %s" % (len(names), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
