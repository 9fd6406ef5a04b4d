// The Python-object half of the step driver's fast-path check (wdopt/optim/_fast.py, FastStep.usable),
// in C: that a param group still lists the same parameters, that ``optimizer.state`` still maps the
// same parameters to the same state dicts, and that those dicts still hold the same state tensors.
//
// Users edit these objects directly (``opt.state[p]["exp_avg"] = t``), so every step compares them
// by identity. In Python that is ``all(map(operator.is_, ...))``: about 35 ns an object, and the
// objects of 10,000 parameters (a dict and three tensors each) are out of cache after the backward
// pass — 4.3 ms a step on the 2-core CPU machine, more than the update itself. Here the same
// comparisons are a pointer compare each, with the next dicts' memory requested ahead.
//
// Called through ctypes.PyDLL (wdopt/kernels/cpp.py, ``object_checks``): the GIL is held, and a
// Python error set here is raised by ctypes. Each returns 1 (all the same), 0 (something differs) or
// -1 (an error is set). Nothing is written; no reference is kept.
#include <Python.h>

#include <cstddef>

namespace {

// Dicts are walked this many ahead of the one compared: the dict object first, then (half as many
// ahead, once the object is in) its table of keys and values.
constexpr Py_ssize_t kAhead = 8;

inline void prefetch_dict_table(PyObject* d) {
  if (!PyDict_Check(d)) return;
  const char* keys = reinterpret_cast<const char*>(reinterpret_cast<PyDictObject*>(d)->ma_keys);
  // The header, the index array and the first entries of a small dict: its first lines.
  __builtin_prefetch(keys);
  __builtin_prefetch(keys + 64);
  __builtin_prefetch(keys + 128);
}

}  // namespace

extern "C" {

// ``current`` (a list or tuple, e.g. group["params"]) holds exactly the objects of the list ``expected``.
int wdopt_same_objects(PyObject* current, PyObject* expected) {
  if (!PyList_Check(expected)) {
    PyErr_SetString(PyExc_TypeError, "wdopt_same_objects: expected must be a list");
    return -1;
  }
  PyObject** items;
  Py_ssize_t n;
  if (PyList_Check(current)) {
    items = PySequence_Fast_ITEMS(current);
    n = PyList_GET_SIZE(current);
  } else if (PyTuple_Check(current)) {
    items = PySequence_Fast_ITEMS(current);
    n = PyTuple_GET_SIZE(current);
  } else {
    return 0;  // another kind of sequence: the validation path looks at it
  }
  if (n != PyList_GET_SIZE(expected)) return 0;
  PyObject** want = PySequence_Fast_ITEMS(expected);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (items[i] != want[i]) return 0;
  }
  return 1;
}

// The dict ``mapping`` (e.g. optimizer.state) holds exactly the keys of the list ``keys`` and the
// values of the list ``values``, in that order (insertion order: a removed and re-added entry differs).
int wdopt_same_items(PyObject* mapping, PyObject* keys, PyObject* values) {
  if (!PyList_Check(keys) || !PyList_Check(values) || PyList_GET_SIZE(keys) != PyList_GET_SIZE(values)) {
    PyErr_SetString(PyExc_TypeError, "wdopt_same_items: keys and values must be lists of one length");
    return -1;
  }
  if (!PyDict_Check(mapping)) return 0;
  const Py_ssize_t n = PyList_GET_SIZE(keys);
  if (PyDict_GET_SIZE(mapping) != n) return 0;
  PyObject** want_keys = PySequence_Fast_ITEMS(keys);
  PyObject** want_values = PySequence_Fast_ITEMS(values);
  Py_ssize_t position = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(mapping, &position, &key, &value)) {
    if (i >= n || key != want_keys[i] || value != want_values[i]) return 0;
    ++i;
  }
  return i == n;
}

// Each dict of the list ``dicts`` maps each string of the tuple ``keys`` to the object the flat list
// ``expected`` holds for it: expected[i * len(keys) + j] is dicts[i][keys[j]], and holds nothing
// else. A missing key differs, and so does an added one.
int wdopt_same_columns(PyObject* dicts, PyObject* keys, PyObject* expected) {
  if (!PyList_Check(dicts) || !PyTuple_Check(keys) || !PyList_Check(expected) ||
      PyList_GET_SIZE(expected) != PyList_GET_SIZE(dicts) * PyTuple_GET_SIZE(keys)) {
    PyErr_SetString(PyExc_TypeError, "wdopt_same_columns: a list of dicts, a tuple of keys and a list of "
                                     "len(dicts) * len(keys) objects are needed");
    return -1;
  }
  const Py_ssize_t n = PyList_GET_SIZE(dicts), k = PyTuple_GET_SIZE(keys);
  PyObject** items = PySequence_Fast_ITEMS(dicts);
  PyObject** names = PySequence_Fast_ITEMS(keys);
  PyObject** want = PySequence_Fast_ITEMS(expected);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(items[i + kAhead]);
    if (i + kAhead / 2 < n) prefetch_dict_table(items[i + kAhead / 2]);
    PyObject* d = items[i];
    if (!PyDict_Check(d) || PyDict_GET_SIZE(d) != k) return 0;
    for (Py_ssize_t j = 0; j < k; ++j) {
      // A borrowed reference, NULL when missing; looking a str up may run a key's __eq__ (a user's
      // non-str key of the same hash), which can raise.
      PyObject* value = PyDict_GetItemWithError(d, names[j]);
      if (value == nullptr) return PyErr_Occurred() ? -1 : 0;
      if (value != want[i * k + j]) return 0;
    }
  }
  return 1;
}

}  // extern "C"
