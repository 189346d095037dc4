"""The tied LM head of a decode step (one token, 0.5b shape: a 151,936 x 896 fp32 table) three ways on ONNX
Runtime's CPU provider, in one process (issue 14): the table as a prepacked constant (format 3), Gemm(transB=1)
over the table as a graph input (format 4 today: what F.linear exports to), and table @ h^T with the table as
the input (the big matrix as GEMM A, so nothing large is packed per call).

    .venv/bin/python benchmarks/tied_head.py
"""
import time, numpy as np, onnxruntime as ort
from onnx import helper as H, TensorProto as TP, numpy_helper
V, D = 151936, 896
rng = np.random.default_rng(0)
table = rng.standard_normal((V, D), dtype=np.float32)
h = rng.standard_normal((1, 1, D), dtype=np.float32)
def model(kind):
    inputs = [H.make_tensor_value_info("h", TP.FLOAT, [1, "T", D])]
    inits = []
    if kind == "const":
        inits = [numpy_helper.from_array(table.T.copy(), "tableT")]
        nodes = [H.make_node("MatMul", ["h", "tableT"], ["logits"])]
    else:
        inputs.append(H.make_tensor_value_info("table", TP.FLOAT, [V, D]))
        if kind == "gemm_tb":   # what F.linear exports to (MatMul with Transpose folded, or Gemm transB)
            nodes = [H.make_node("Reshape", ["h", "shape2"], ["h2"]), H.make_node("Gemm", ["h2", "table"], ["l2"], transB=1),
                     H.make_node("Reshape", ["l2", "shape3"], ["logits"])]
            inits = [numpy_helper.from_array(np.array([-1, D], np.int64), "shape2"), numpy_helper.from_array(np.array([1, -1, V], np.int64), "shape3")]
        elif kind == "table_first":   # logits^T = table @ h^T: the big matrix is A, h is the packed B
            nodes = [H.make_node("Transpose", ["h"], ["hT"], perm=[0, 2, 1]), H.make_node("MatMul", ["table", "hT"], ["lT"]),
                     H.make_node("Transpose", ["lT"], ["logits"], perm=[0, 2, 1])]
    g = H.make_graph(nodes, "g", inputs, [H.make_tensor_value_info("logits", TP.FLOAT, None)], inits)
    m = H.make_model(g, opset_imports=[H.make_opsetid("", 17)]); m.ir_version = 9
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
sess = {k: model(k) for k in ("const", "gemm_tb", "table_first")}
ref = None
for k, s in sess.items():
    feeds = {"h": h} if k == "const" else {"h": h, "table": table}
    out = s.run(None, feeds)[0].reshape(-1)
    ref = out if ref is None else ref
    print(k, np.abs(out - ref).max())
for rnd in range(3):
    for k, s in sess.items():
        feeds = {"h": h} if k == "const" else {"h": h, "table": table}
        s.run(None, feeds)
        t = time.perf_counter()
        for _ in range(20): s.run(None, feeds)
        print(rnd, k, f"{(time.perf_counter()-t)/20*1e3:.2f} ms")
