/* A decode step's half-layers, each in one call: the attention's q/k/v products, biases, q/k norms,
 * RoPE, attention and o product; the MLP's gate/up products, biases, SiLU and down product. What comes
 * back is the rank's partial sum, which the model allreduces (parallel.RowParallelLinear.reduce).
 *
 * The same steps, in the same order, as the model's Python path under the int8 kernels: the same
 * qdot.c products and rowops.c row steps, so a row gets the same bits either way (rowops.py takes this
 * call only for steps whose every row is a one-row piece; other steps go step by step, and a decode
 * row among them must not differ). At SmolLM2's sizes this is ~40 torch ops a layer fewer.
 */
#include <stdlib.h>

#include "qdot.h"

static int parse_mats(PyObject *tuple, int want, int cols, qmat_t *m) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != want) {
        PyErr_Format(PyExc_ValueError, "qdot: expected %d matrices", want);
        return -1;
    }
    for (int i = 0; i < want; i++)
        if (qdot_parse_mat(PyTuple_GET_ITEM(tuple, i), cols, &m[i])) return -1;
    return 0;
}

static void add_bias(float *y, const float *bias, int64_t rows, int64_t cols) {
    if (!bias) return;
    for (int64_t t = 0; t < rows; t++)
        for (int64_t i = 0; i < cols; i++) y[t * cols + i] += bias[i];
}

/* attention_rows(x, T, dim, (q, k, v), (bq, bk, bv), (q_norm, k_norm, eps), (cos, sin),
 *                (heads, kv_heads, hd, kv_index, keys, values, head_stride, code), (pos, start, index), o, y, threads)
 * x (T, dim) the normed rows; biases and norms 0 when the model has none; cos, sin (T, hd); pos, start and
 * index: T int64 each, a row's position and where its sequence lies in the pool (index: 0 or the address
 * of its int64 positions); o a matrix of heads * hd columns; y (T, dim) the partial output. */
PyObject *py_attention_rows(PyObject *self, PyObject *args) {
    unsigned long long x, bq, bk, bv, qn, kn, cos, sin, kv_index, keys, values, pos, start, index, y;
    long long heads, kv_heads, hd, head_stride;
    int T, dim, code, threads;
    float eps;
    PyObject *qkv, *o;
    if (!PyArg_ParseTuple(args, "KiiO(KKK)(KKf)(KK)(LLLKKKLi)(KKK)OKi", &x, &T, &dim, &qkv, &bq, &bk, &bv, &qn, &kn,
                          &eps, &cos, &sin, &heads, &kv_heads, &hd, &kv_index, &keys, &values, &head_stride, &code,
                          &pos, &start, &index, &o, &y, &threads))
        return NULL;
    qmat_t m[3], om;
    if (T < 1 || T > QDOT_MAX_TOKENS || rows_check_attend(heads, hd) || parse_mats(qkv, 3, dim, m) ||
        qdot_parse_mat(o, (int)(heads * hd), &om))
        return NULL;
    int64_t nq = heads * hd, nkv = kv_heads * hd;
    if (m[0].rows != nq || m[1].rows != nkv || m[2].rows != nkv || om.rows != dim)
        return PyErr_Format(PyExc_ValueError, "qdot.attention_rows: q/k/v/o of %d/%d/%d/%d rows for %lld heads and "
                            "%lld kv heads of %lld", m[0].rows, m[1].rows, m[2].rows, om.rows, heads, kv_heads, hd);
    float *buf = malloc(sizeof(float) * T * (2 * nq + 2 * nkv));
    if (!buf) return PyErr_NoMemory();
    float *q = buf, *k = q + T * nq, *v = k + T * nkv, *att = v + T * nkv;
    m[0].y = q, m[1].y = k, m[2].y = v, om.y = (float *)y;
    kvstore_t s = {(char *)keys, (char *)values, head_stride, code};
    const int64_t *at = (const int64_t *)pos, *st = (const int64_t *)start, *ix = (const int64_t *)index;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = qdot_matmul(m, 3, dim, (const float *)x, T, threads);
    if (!err) {
        add_bias(q, (const float *)bq, T, nq);
        add_bias(k, (const float *)bk, T, nkv);
        add_bias(v, (const float *)bv, T, nkv);
        if (qn) rows_rmsnorm(q, (const float *)qn, q, T * heads, hd, eps);
        if (kn) rows_rmsnorm(k, (const float *)kn, k, T * kv_heads, hd, eps);
        rows_rope(q, (const float *)cos, (const float *)sin, T, heads, hd);
        rows_rope(k, (const float *)cos, (const float *)sin, T, kv_heads, hd);
        for (int t = 0; t < T && !err; t++) {
            place_t place = {st[t], (const int64_t *)(uintptr_t)ix[t]};
            err = rows_attend(q + t * nq, k + t * nkv, v + t * nkv, att + t * nq, heads, kv_heads, hd,
                              (const int64_t *)kv_index, &s, place, at[t], threads);
        }
    }
    if (!err) err = qdot_matmul(&om, 1, (int)nq, att, T, threads);
    Py_END_ALLOW_THREADS
    free(buf);
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* mlp_rows(x, T, dim, (gate, up), (b_gate, b_up), down, y, threads): x (T, dim) the normed rows; y (T, dim)
 * the partial output of down (silu(x gate^T + b) * (x up^T + b)) @ down^T. */
PyObject *py_mlp_rows(PyObject *self, PyObject *args) {
    unsigned long long x, bg, bu, y;
    int T, dim, threads;
    PyObject *gate_up, *down;
    if (!PyArg_ParseTuple(args, "KiiO(KK)OKi", &x, &T, &dim, &gate_up, &bg, &bu, &down, &y, &threads)) return NULL;
    qmat_t m[2], dm;
    if (T < 1 || T > QDOT_MAX_TOKENS || parse_mats(gate_up, 2, dim, m)) return NULL;
    int64_t ffn = m[0].rows;
    if (m[1].rows != ffn || qdot_parse_mat(down, (int)ffn, &dm)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "qdot.mlp_rows: gate of %d rows, up of %d", m[0].rows, m[1].rows);
        return NULL;
    }
    if (dm.rows != dim) return PyErr_Format(PyExc_ValueError, "qdot.mlp_rows: down of %d rows for %d", dm.rows, dim);
    float *buf = malloc(sizeof(float) * T * 2 * ffn);
    if (!buf) return PyErr_NoMemory();
    float *g = buf, *u = buf + T * ffn;
    m[0].y = g, m[1].y = u, dm.y = (float *)y;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = qdot_matmul(m, 2, dim, (const float *)x, T, threads);
    if (!err) {
        add_bias(g, (const float *)bg, T, ffn);
        add_bias(u, (const float *)bu, T, ffn);
        rows_silu_mul(g, u, g, T * ffn);
        err = qdot_matmul(&dm, 1, (int)ffn, g, T, threads);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
