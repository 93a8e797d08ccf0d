"""SavedModels that carry more than weights: tables, assets, state, control flow, MetaGraphs.

Each builder writes a SavedModel the way users write one and returns
{signature key: [input dicts]} of valid inputs (real vocabulary words,
in-range ids). Batch norms get random statistics so every fold is non-trivial.
"""

import os

import numpy as np
import tensorflow as tf

VOCABULARY = ["apple", "banana", "cherry", "damson", "elder"]
RNG = np.random.default_rng(99)


def _random_bn(channels, rng=RNG):
    return (rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.normal(0, 0.5, channels).astype(np.float32),
            rng.normal(0, 0.5, channels).astype(np.float32), rng.uniform(0.2, 2.0, channels).astype(np.float32))


def _write_vocabulary(folder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocabulary.txt")
    with open(path, "w") as f:
        f.write("\n".join(VOCABULARY) + "\n")
    return path


def _words(shape):
    return np.array(VOCABULARY + ["unknown-word"], dtype=object)[RNG.integers(0, len(VOCABULARY) + 1, shape)]


def _randomize_keras_batch_norms(model):
    import keras
    import keras_flavour  # benchmarks/, on the path from conftest: one randomizer for tests and benchmark
    keras_flavour.randomize_batch_norms(keras, model, RNG)


def static_hash_table(path):
    """tf.saved_model.save of a module whose StaticHashTable reads a vocabulary asset."""
    vocabulary = _write_vocabulary(path + "_src")

    class TableModel(tf.Module):
        def __init__(self):
            initializer = tf.lookup.TextFileInitializer(
                vocabulary, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticHashTable(initializer, -1)
            self.embedding = tf.Variable(RNG.standard_normal((len(VOCABULARY) + 1, 6)).astype(np.float32))
            self.kernel = tf.Variable(RNG.standard_normal((6, 4)).astype(np.float32))
            gamma, beta, mean, variance = _random_bn(4)
            self.scale = tf.Variable(gamma / np.sqrt(variance + 1e-3))
            self.shift = tf.Variable(beta - mean * gamma / np.sqrt(variance + 1e-3))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, words):
            ids = self.table.lookup(words) + 1
            x = tf.gather(self.embedding, ids)
            return {"scores": tf.matmul(x, self.kernel) * self.scale + self.shift, "ids": ids}

    module = TableModel()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"words": _words((7,))}]}


def integer_table(path, initializer="key_value", dtype=tf.int64):
    """A tf.Module whose signature maps integer ids through a StaticHashTable of integer keys and
    values (from a KeyValueTensorInitializer, or a TextFileInitializer with integer columns), then
    runs an embedding, a Conv1D and a batch norm's scale and shift."""
    keys, values = np.array([3, 7, 11, 20], np.int64), np.array([0, 1, 2, 3], np.int64)
    if initializer == "key_value":
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, dtype), tf.constant(values, dtype))
    else:
        os.makedirs(path + "_src", exist_ok=True)
        table_file = os.path.join(path + "_src", "ids.tsv")
        with open(table_file, "w") as f:
            f.write("".join("%d\t%d\n" % kv for kv in zip(keys, values)))
        init = tf.lookup.TextFileInitializer(table_file, tf.int64, 0, tf.int64, 1, delimiter="\t")
        dtype = tf.int64  # a text file's integer columns are int64

    class IdModel(tf.Module):
        def __init__(self):
            self.table = tf.lookup.StaticHashTable(init, tf.constant(-1, dtype))
            self.embedding = tf.Variable(RNG.standard_normal((5, 4)).astype(np.float32))
            self.kernel = tf.Variable(RNG.standard_normal((3, 4, 6)).astype(np.float32))
            gamma, beta, mean, variance = _random_bn(6)
            self.scale = tf.Variable(gamma / np.sqrt(variance + 1e-3))
            self.shift = tf.Variable(beta - mean * gamma / np.sqrt(variance + 1e-3))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], dtype, name="ids")])
        def serve(self, ids):
            mapped = self.table.lookup(ids)
            y = tf.nn.conv1d(tf.gather(self.embedding, mapped + 1), self.kernel, 1, "SAME")
            return {"y": y * self.scale + self.shift, "mapped": mapped}

    module = IdModel()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    ids = RNG.choice(np.concatenate([keys, [0, 5, 99]]), (3, 8)).astype(dtype.as_numpy_dtype)
    return {"serving_default": [{"ids": ids}]}


def table_lookup_classifier(path):
    """Issue 26's integer-table model: ids mapped by an int64 -> int64 StaticHashTable gather rows
    of an embedding, a MatMul + tf.nn.batch_normalization scores them, and an int64 -> string
    table names the argmax. Returns valid inputs (ids that hit the table, and ones that miss)."""
    rng = np.random.default_rng(1234)

    class Table(tf.Module):
        def __init__(self):
            self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(np.arange(10), tf.int64), tf.constant(rng.permutation(10), tf.int64)), default_value=0)
            self.names = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(np.arange(6), tf.int64), tf.constant(["c%d" % i for i in range(6)])), default_value="?")
            self.emb = tf.Variable(rng.standard_normal((10, 8)).astype(np.float32))
            self.w = tf.Variable(rng.standard_normal((32, 6)).astype(np.float32) * 0.2)
            gamma, beta, mean, variance = _random_bn(6)
            self.gamma, self.beta, self.mean, self.var = (tf.Variable(v) for v in (gamma, beta, mean, variance))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.int64, name="ids")])
        def serve(self, ids):
            e = tf.reshape(tf.gather(self.emb, self.table.lookup(ids)), [-1, 32])
            y = tf.nn.batch_normalization(tf.matmul(e, self.w), self.mean, self.var, self.beta, self.gamma, 1e-3)
            return {"y": y, "label": self.names.lookup(tf.argmax(y, axis=1))}

    module = Table()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"ids": rng.integers(0, 12, (5, 4)).astype(np.int64)}]}


def unknown_rank(path, consumer="conv"):
    """A signature whose input has unknown rank (TensorSpec(None)); it feeds a Conv2D (which needs
    rank 4 with 3 channels) then a batch norm's scale and shift ("conv"), the same conv after
    tf.reshape(x, [-1, 8, 8, 3]) ("reshape"), or a reduction, which takes any rank ("reduce").
    Returns valid inputs."""

    class AnyRank(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 3, 4)).astype(np.float32))
            gamma, beta, mean, variance = _random_bn(4)
            self.scale = tf.Variable(gamma / np.sqrt(variance + 1e-3))
            self.shift = tf.Variable(beta - mean * gamma / np.sqrt(variance + 1e-3))

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
        def serve(self, x):
            if consumer == "conv":
                y = tf.nn.conv2d(x, self.kernel, 1, "SAME")
            elif consumer == "reshape":
                y = tf.nn.conv2d(tf.reshape(x, [-1, 8, 8, 3]), self.kernel, 1, "SAME")
            else:
                y = tf.reduce_sum(x) * self.kernel
            return {"y": y * self.scale + self.shift}

    module = AnyRank()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    shape = (2, 8 * 8 * 3) if consumer == "reshape" else (2, 6, 6, 3)  # a flat batch, as a user may send it
    return {"serving_default": [{"x": RNG.standard_normal(shape).astype(np.float32)}]}


def counter(path):
    """A signature that increments a variable on every call (and folds a conv + scale)."""

    class Counter(tf.Module):
        def __init__(self):
            self.calls = tf.Variable(0.0)
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 2, 4)).astype(np.float32))
            self.scale = tf.Variable(RNG.uniform(0.5, 2.0, 4).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
        def serve(self, x):
            self.calls.assign_add(1.0)
            y = tf.nn.conv2d(x, self.kernel, 1, "SAME") * self.scale
            return {"y": y, "calls": self.calls.read_value()}

    module = Counter()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": RNG.standard_normal((2, 8, 8, 2)).astype(np.float32)}] * 2}


def two_input_functions(path):
    """A signature wrapping `serve(z, a)` (positional order unlike the signature's sorted keys a, z),
    and a second tf.function, `scale_only`, that no signature calls."""

    class TwoInputs(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 2, 4)).astype(np.float32))
            self.scale = tf.Variable(RNG.uniform(0.5, 2.0, 4).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="z"),
                                      tf.TensorSpec([None, 8, 8, 4], tf.float32, name="a")])
        def serve(self, z, a):
            y = tf.nn.conv2d(z, self.kernel, 1, "SAME") * self.scale
            return {"y": y + 2.0 * a, "y_only": y}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def scale_only(self, x):
            return x * self.scale

    module = TwoInputs()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"z": RNG.standard_normal((2, 8, 8, 2)).astype(np.float32),
                                 "a": RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)}]}


def lookalike_functions(path):
    """A signature wrapping `serve(x)`, and two tf.functions no signature calls, of the same input:
    `same_again` computes what serve computes, `doubled` twice that."""

    class Lookalikes(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 2, 4)).astype(np.float32))
            self.scale = tf.Variable(RNG.uniform(0.5, 2.0, 4).astype(np.float32))

        def _conv_scale(self, x):
            return tf.nn.conv2d(x, self.kernel, 1, "SAME") * self.scale

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"y": self._conv_scale(x)}

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="x")])
        def same_again(self, x):
            return self._conv_scale(x)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="x")])
        def doubled(self, x):
            return 2.0 * self._conv_scale(x)

    module = Lookalikes()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": RNG.standard_normal((2, 8, 8, 2)).astype(np.float32)}]}


def while_and_cond(path):
    """tf.while_loop and tf.cond around conv + batch norm, and a foldable conv + batch norm after them."""

    class Loop(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3)
            self.bn = [tf.Variable(v) for v in _random_bn(3)]

        def _conv_bn(self, x):
            gamma, beta, mean, variance = self.bn
            y = tf.nn.conv2d(x, self.kernel, 1, "SAME")
            return tf.nn.batch_normalization(y, mean, variance, beta, gamma, 1e-3)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32), tf.TensorSpec([], tf.int32)])
        def serve(self, x, steps):
            def body(i, y):
                z = self._conv_bn(y)
                return i + 1, tf.cond(tf.reduce_mean(z) > 0, lambda: tf.nn.relu(z), lambda: z * 0.5)

            _, y = tf.while_loop(lambda i, y: i < steps, body, [tf.constant(0), x])
            return {"y": self._conv_bn(y)}

    module = Loop()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    return {"serving_default": [{"x": x, "steps": np.int32(0)}, {"x": x, "steps": np.int32(3)}]}


def loop_classifier(path):
    """A stem conv + FusedBatchNormV3, then a tf.while_loop three times over two conv + batch
    norm + ReLU blocks with loop-invariant weights, global average pooling and a 100-class
    softmax: what hides an error in a loop body's fold from the output. Its own seed: how far a
    planted error shows at the output depends on the weights, not on the builders run before."""
    rng = np.random.default_rng(7)

    class LoopClassifier(tf.Module):
        def __init__(self):
            self.stem = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
            self.kernels = [tf.Variable(rng.normal(0, 0.2, (3, 3, 8, 8)).astype(np.float32)) for _ in range(2)]
            self.bn = [[tf.Variable(v) for v in _random_bn(8, rng)] for _ in range(3)]
            self.dense = tf.Variable(rng.normal(0, 0.3, (8, 100)).astype(np.float32))

        def _conv_bn(self, x, kernel, bn):
            gamma, beta, mean, variance = bn
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
            return tf.compat.v1.nn.fused_batch_norm(y, gamma, beta, mean, variance, epsilon=1e-3,
                                                    is_training=False)[0]

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def serve(self, x):
            y = self._conv_bn(x, self.stem, self.bn[0])

            def body(i, y):
                y = tf.nn.relu(self._conv_bn(y, self.kernels[0], self.bn[1]))
                return i + 1, tf.nn.relu(self._conv_bn(y, self.kernels[1], self.bn[2]))
            _, y = tf.while_loop(lambda i, y: i < 3, body, [tf.constant(0), y])
            return {"probabilities": tf.nn.softmax(tf.matmul(tf.reduce_mean(y, [1, 2]), self.dense))}

    module = LoopClassifier()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": rng.standard_normal((2, 8, 8, 3)).astype(np.float32)}]}


def branch_conv_bn(path):
    """tf.cond on an input flag: one branch runs conv + batch norm, the other a conv alone."""

    class Branch(tf.Module):
        def __init__(self):
            self.kernels = [tf.Variable(RNG.normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32)) for _ in range(2)]
            self.bn = [tf.Variable(v) for v in _random_bn(4)]

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x"),
                                      tf.TensorSpec([], tf.bool, name="normalized")])
        def serve(self, x, normalized):
            def with_bn():
                gamma, beta, mean, variance = self.bn
                y = tf.nn.conv2d(x, self.kernels[0], 1, "SAME")
                return tf.nn.batch_normalization(y, mean, variance, beta, gamma, 1e-3)
            return {"y": tf.cond(normalized, with_bn, lambda: tf.nn.conv2d(x, self.kernels[1], 1, "SAME"))}

    module = Branch()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    return {"serving_default": [{"x": x, "normalized": np.bool_(True)}, {"x": x, "normalized": np.bool_(False)}]}


def bn_then_scale(path):
    """conv -> FusedBatchNormV3 -> times a scalar variable: the batch norm folds into the conv,
    then the scale into the same conv (fold_affine), which takes the batch norm's output away."""

    class Scaled(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32))
            self.bn = [tf.Variable(v) for v in _random_bn(4)]
            self.scale = tf.Variable(np.float32(-1.7))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def serve(self, x):
            gamma, beta, mean, variance = self.bn
            y = tf.raw_ops.FusedBatchNormV3(x=tf.nn.conv2d(x, self.kernel, 1, "SAME"), scale=gamma, offset=beta,
                                            mean=mean, variance=variance, epsilon=1e-3, is_training=False)[0]
            return {"y": y * self.scale}

    module = Scaled()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)}]}


def tf1_builder(path):
    """TF1 Builder: a vocabulary asset, a table, a main_op, and two MetaGraphs (serve; gpu,serve with
    one more signature). Returns {tag set: {signature: [inputs]}}."""
    vocabulary = _write_vocabulary(path + "_src")
    graph = tf.Graph()
    with graph.as_default():
        v1 = tf.compat.v1
        words = v1.placeholder(tf.string, [None], name="words")
        images = v1.placeholder(tf.float32, [None, 6, 6, 2], name="images")
        asset = tf.constant(vocabulary, name="vocabulary_path")
        v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, asset)
        table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(asset, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                          tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER), -1)
        ids = table.lookup(words)
        kernel = v1.get_variable("kernel", initializer=RNG.standard_normal((3, 3, 2, 4)).astype(np.float32))
        gamma, beta, mean, variance = [tf.constant(v) for v in _random_bn(4)]
        y, _, _ = v1.nn.fused_batch_norm(tf.nn.conv2d(images, kernel, 1, "SAME"), gamma, beta, mean, variance,
                                         epsilon=1e-3, is_training=False)
        main_op = tf.group(v1.tables_initializer(), name="main_op")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            session.run(main_op)
            builder = v1.saved_model.Builder(path)
            signature = v1.saved_model.predict_signature_def({"words": words, "images": images},
                                                             {"ids": ids, "features": y})
            builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature},
                                                 main_op=main_op, assets_collection=v1.get_collection(
                                                     v1.GraphKeys.ASSET_FILEPATHS))
            # The main op is in the graph's collection now: the second MetaGraph has it too.
            features = v1.saved_model.predict_signature_def({"images": images}, {"features": y})
            builder.add_meta_graph(["serve", "gpu"], {"serving_default": signature, "features": features},
                                   assets_collection=v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS))
            builder.save()
    both = {"words": _words((5,)), "images": RNG.standard_normal((2, 6, 6, 2)).astype(np.float32)}
    return {"serve": {"serving_default": [both]},
            "gpu,serve": {"serving_default": [both], "features": [{"images": both["images"]}]}}


def tf1_local_variable(path, read=True):
    """TF1 Builder: conv -> batch norm, times a local variable (not in the checkpoint) that the
    main op initializes each time the model loads; read=False: no signature reads it."""
    graph = tf.Graph()
    with graph.as_default():
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        kernel = v1.get_variable("kernel", initializer=RNG.standard_normal((3, 3, 3, 4)).astype(np.float32),
                                 use_resource=True)
        scale = v1.get_variable("scale", initializer=np.float32(-1.5), use_resource=True,
                                collections=[v1.GraphKeys.LOCAL_VARIABLES])
        gamma, beta, mean, variance = [tf.constant(v) for v in _random_bn(4)]
        y, _, _ = v1.nn.fused_batch_norm(tf.nn.conv2d(x, kernel, 1, "SAME"), gamma, beta, mean, variance,
                                         epsilon=1e-3, is_training=False)
        if read:
            y = y * scale
        with v1.Session(graph=graph) as session:
            session.run([v1.global_variables_initializer(), v1.local_variables_initializer()])
            builder = v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                session, ["serve"], {"serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y})},
                main_op=v1.local_variables_initializer())
            builder.save()
    return {"serving_default": [{"x": RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)}]}


def keras3_string_lookup(path):
    """Keras 3: StringLookup + Embedding + Conv1D + BatchNormalization, exported with model.export."""
    import keras
    L = keras.layers
    words = keras.Input((6,), dtype="string", name="inputs")
    x = L.StringLookup(vocabulary=VOCABULARY)(words)
    x = L.Embedding(len(VOCABULARY) + 1, 5)(x)
    x = L.Conv1D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    model = keras.Model(words, x)
    _randomize_keras_batch_norms(model)
    model.export(path, verbose=False)
    return {"serve": [{"inputs": _words((2, 6))}], "serving_default": [{"inputs": _words((2, 6))}]}


def keras3_recurrent(path, layer="LSTM"):
    """Keras 3: LSTM or GRU (return_sequences) -> Dense -> BatchNormalization."""
    import keras
    L = keras.layers
    model = keras.Sequential([keras.Input((5, 3), name="inputs"), getattr(L, layer)(4, return_sequences=True), L.Dense(6),
                              L.BatchNormalization()])
    _randomize_keras_batch_norms(model)
    model.export(path, verbose=False)
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    return {"serve": [{"inputs": x}], "serving_default": [{"inputs": x}]}


def keras3_training_batch_norm(path):
    """Keras 3: a functional model whose second batch norm is called with training=True.

    Every call then normalizes by the batch and updates that layer's moving
    averages: those variables are written, and the batch norm cannot fold.
    """
    import keras
    L = keras.layers
    inputs = keras.Input((8, 8, 3), name="inputs")
    x = L.BatchNormalization(name="inference_bn")(L.Conv2D(4, 3, padding="same")(inputs))
    x = L.BatchNormalization(name="training_bn")(L.Conv2D(4, 3, padding="same")(x), training=True)
    model = keras.Model(inputs, x)
    _randomize_keras_batch_norms(model)
    model.export(path, verbose=False)
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    return {"serve": [{"inputs": x}], "serving_default": [{"inputs": x}]}


def keras3_one_conv_bn(path):
    """Keras 3: the smallest model with a fold, Conv2D -> BatchNormalization."""
    import keras
    model = keras.Sequential([keras.Input((8, 8, 3), name="inputs"), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization()])
    _randomize_keras_batch_norms(model)
    model.export(path, verbose=False)
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    return {"serve": [{"inputs": x}], "serving_default": [{"inputs": x}]}


def stateful_random(path):
    """tf.nn.dropout in a tf.Module: a stateful random op, other values on every call."""

    class Noisy(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(RNG.standard_normal((3, 3, 2, 4)).astype(np.float32))
            self.scale = tf.Variable(RNG.uniform(0.5, 2.0, 4).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32)])
        def serve(self, x):
            y = tf.nn.conv2d(x, self.kernel, 1, "SAME") * self.scale
            return {"dropped": tf.nn.dropout(y, 0.5), "clean": y}

    module = Noisy()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return {"serving_default": [{"x": RNG.standard_normal((2, 8, 8, 2)).astype(np.float32)}]}


def keras3_grouped_conv_bn(path):
    """Keras 3 Conv2D(groups=4): the conv runs in a jit_compile function called from the graph."""
    import keras
    model = keras.Sequential([keras.Input((8, 8, 8), name="inputs"), keras.layers.Conv2D(8, 3, groups=4, padding="same"),
                              keras.layers.BatchNormalization()])
    _randomize_keras_batch_norms(model)
    model.export(path, verbose=False)
    x = RNG.standard_normal((2, 8, 8, 8)).astype(np.float32)
    return {"serve": [{"inputs": x}], "serving_default": [{"inputs": x}]}
