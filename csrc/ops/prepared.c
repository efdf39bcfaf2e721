/* The per-call half of a prepared launch (hicache_kernels.ops.launch_prepared),
 * compiled: check that both index tensors can go straight to the kernel, then
 * call the CUDA library's hck_copy_prepared, with no Python frame in between.
 *
 * A plain C extension (no torch, no CUDA headers): the tensors are asked through
 * their Python methods, exactly what ops.launch_prepared asks when this module is
 * not built (tests run both on the same calls), and the library's function comes
 * as an address from ctypes.
 *
 *   setup(tensor_type, int64)      torch.Tensor and torch.int64, once
 *   launch(fn, descs, n_descs, index, src, dst, stream, events) -> True | False | int
 *
 * True: launched. False: declined, nothing done: an index tensor is not exactly a
 * torch.Tensor of dtype int64 with strides (1,) on device ``index`` (-1: the CPU),
 * or the two differ in length; the checked path then takes the call. An int: the
 * library's error code (hck_last_error says why). ``events`` is None or a buffer of
 * n_descs raw event handles (a ctypes array). The GIL is released around the
 * library call; the caller holds the tensors, the descriptions and the events.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*copy_prepared_fn)(const void* descs, int64_t n_descs, const int64_t* src_indices,
                                const int64_t* dst_indices, int64_t n_items, void* stream,
                                void* const* events);

static PyObject *s_dtype, *s_stride, *s_get_device, *s_numel, *s_data_ptr;
static PyObject *g_tensor_type, *g_int64;

/* A method's int result; -1 with no exception set is a valid answer, so errors
 * are reported through *ok. */
static long long call_int(PyObject* t, PyObject* name, int* ok) {
  PyObject* r = PyObject_CallMethodNoArgs(t, name);
  if (r == NULL) {
    *ok = 0;
    return 0;
  }
  const long long v = PyLong_AsLongLong(r);
  Py_DECREF(r);
  if (v == -1 && PyErr_Occurred()) *ok = 0;
  return v;
}

/* 1 when ``t`` can go straight to the kernel, with its address and length. */
static int usable(PyObject* t, long long index, int64_t* address, int64_t* length) {
  if ((PyObject*)Py_TYPE(t) != g_tensor_type) return 0;
  PyObject* dtype = PyObject_GetAttr(t, s_dtype);
  if (dtype == NULL) return 0;
  const int int64 = dtype == g_int64;
  Py_DECREF(dtype);
  if (!int64) return 0;
  PyObject* stride = PyObject_CallMethodNoArgs(t, s_stride);
  if (stride == NULL) return 0;
  int ok = PyTuple_Check(stride) && PyTuple_GET_SIZE(stride) == 1 &&
           PyLong_Check(PyTuple_GET_ITEM(stride, 0)) &&
           PyLong_AsLongLong(PyTuple_GET_ITEM(stride, 0)) == 1;
  Py_DECREF(stride);
  if (!ok) return 0;
  if (call_int(t, s_get_device, &ok) != index || !ok) return 0;
  *length = call_int(t, s_numel, &ok);
  *address = call_int(t, s_data_ptr, &ok);
  return ok;
}

static PyObject* prepared_launch(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "launch(fn, descs, n_descs, index, src, dst, stream, events)");
    return NULL;
  }
  if (g_tensor_type == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "launch: setup(torch.Tensor, torch.int64) first");
    return NULL;
  }
  copy_prepared_fn fn = (copy_prepared_fn)PyLong_AsVoidPtr(args[0]);
  const void* descs = PyLong_AsVoidPtr(args[1]);
  const long long n_descs = PyLong_AsLongLong(args[2]);
  const long long index = PyLong_AsLongLong(args[3]);
  void* stream = args[6] == Py_None ? NULL : PyLong_AsVoidPtr(args[6]);
  if (PyErr_Occurred()) return NULL;
  if (fn == NULL || descs == NULL || n_descs < 1) {
    PyErr_SetString(PyExc_ValueError, "launch: expected a function, descriptions and n_descs >= 1");
    return NULL;
  }
  int64_t src, dst, n_src, n_dst;
  if (!usable(args[4], index, &src, &n_src) || !usable(args[5], index, &dst, &n_dst) ||
      n_src != n_dst) {
    PyErr_Clear();   /* a tensor whose methods raise (sparse, nested): the checked path names it */
    Py_RETURN_FALSE;
  }
  Py_buffer events;
  int held = 0;
  if (args[7] != Py_None) {
    if (PyObject_GetBuffer(args[7], &events, PyBUF_SIMPLE) < 0) return NULL;
    held = 1;
    if (events.len < (Py_ssize_t)(n_descs * (long long)sizeof(void*))) {
      PyBuffer_Release(&events);
      PyErr_Format(PyExc_ValueError, "events: expected %lld event handles", n_descs);
      return NULL;
    }
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = fn(descs, n_descs, (const int64_t*)(intptr_t)src, (const int64_t*)(intptr_t)dst, n_src, stream,
          held ? (void* const*)events.buf : NULL);
  Py_END_ALLOW_THREADS
  if (held) PyBuffer_Release(&events);
  if (rc != 0) return PyLong_FromLong(rc);
  Py_RETURN_TRUE;
}

static PyObject* prepared_setup(PyObject* self, PyObject* args) {
  PyObject *tensor_type, *int64;
  if (!PyArg_ParseTuple(args, "OO", &tensor_type, &int64)) return NULL;
  Py_INCREF(tensor_type);
  Py_INCREF(int64);
  Py_XSETREF(g_tensor_type, tensor_type);
  Py_XSETREF(g_int64, int64);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"launch", (PyCFunction)(void (*)(void))prepared_launch, METH_FASTCALL,
     "launch(fn, descs, n_descs, index, src, dst, stream, events) -> True | False | int"},
    {"setup", prepared_setup, METH_VARARGS, "setup(tensor_type, int64)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prepared", "A prepared launch's per-call checks and C call.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__prepared(void) {
  s_dtype = PyUnicode_InternFromString("dtype");
  s_stride = PyUnicode_InternFromString("stride");
  s_get_device = PyUnicode_InternFromString("get_device");
  s_numel = PyUnicode_InternFromString("numel");
  s_data_ptr = PyUnicode_InternFromString("data_ptr");
  if (!s_dtype || !s_stride || !s_get_device || !s_numel || !s_data_ptr) return NULL;
  return PyModule_Create(&module);
}
