/*
 * pgwarden.native._pgoutput: pgoutput's change messages (Insert, Update, Delete), decoded for
 * WAL capture's consumer.
 *
 * This is a Python extension, not a server module: it runs in the consumer. It does exactly
 * what wal._decode_change_py does (that one is the reference, and the fallback when this is not
 * built), because decoding every column of every change in Python was the largest part of the
 * consumer's time: about 4 us per tuple, half of a catch-up. Each value comes out as a field of
 * COPY's text format (its text escaped; NULL as \N, an unchanged TOAST value as \u), ready to
 * write. A malformed message raises ValueError, never reads past the buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *null_value;		/* b"\\N" */
static PyObject *unchanged_value;	/* b"\\u" */
static PyObject *op_insert;
static PyObject *op_update;
static PyObject *op_delete;

static uint32_t
be32(const unsigned char *p)
{
	return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | p[3];
}

static PyObject *
malformed(const char *what)
{
	PyErr_Format(PyExc_ValueError, "pgoutput: %s", what);
	return NULL;
}

/* One text value as a COPY text field: \ tab newline and carriage return escaped. */
static PyObject *
copy_field(const unsigned char *p, Py_ssize_t n)
{
	Py_ssize_t	extra = 0;
	Py_ssize_t	i;
	PyObject   *out;
	char	   *w;

	for (i = 0; i < n; i++)
	{
		unsigned char c = p[i];

		if (c == '\\' || c == '\t' || c == '\n' || c == '\r')
			extra++;
	}
	if (extra == 0)
		return PyBytes_FromStringAndSize((const char *) p, n);
	out = PyBytes_FromStringAndSize(NULL, n + extra);
	if (out == NULL)
		return NULL;
	w = PyBytes_AS_STRING(out);
	for (i = 0; i < n; i++)
	{
		unsigned char c = p[i];

		switch (c)
		{
			case '\\':
				*w++ = '\\';
				*w++ = '\\';
				break;
			case '\t':
				*w++ = '\\';
				*w++ = 't';
				break;
			case '\n':
				*w++ = '\\';
				*w++ = 'n';
				break;
			case '\r':
				*w++ = '\\';
				*w++ = 'r';
				break;
			default:
				*w++ = (char) c;
		}
	}
	return out;
}

/* TupleData at *pos: a list of COPY fields; *pos moves past it. */
static PyObject *
tuple_data(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *pos)
{
	Py_ssize_t	at = *pos;
	int			n;
	int			i;
	PyObject   *values;

	if (at + 2 > len)
		return malformed("a tuple runs past the end of its message");
	n = (int16_t) (((unsigned) buf[at] << 8) | buf[at + 1]);
	at += 2;
	if (n < 0)
		return malformed("a tuple with a negative number of columns");
	values = PyList_New(n);
	if (values == NULL)
		return NULL;
	for (i = 0; i < n; i++)
	{
		PyObject   *value;
		unsigned char kind;

		if (at >= len)
		{
			Py_DECREF(values);
			return malformed("a tuple runs past the end of its message");
		}
		kind = buf[at++];
		if (kind == 't')
		{
			int32_t		length;

			if (at + 4 > len)
			{
				Py_DECREF(values);
				return malformed("a tuple runs past the end of its message");
			}
			length = (int32_t) be32(buf + at);
			at += 4;
			if (length < 0 || length > len - at)
			{
				Py_DECREF(values);
				return malformed("a tuple runs past the end of its message");
			}
			value = copy_field(buf + at, length);
			at += length;
			if (value == NULL)
			{
				Py_DECREF(values);
				return NULL;
			}
		}
		else if (kind == 'n')
		{
			value = null_value;
			Py_INCREF(value);
		}
		else if (kind == 'u')
		{
			value = unchanged_value;
			Py_INCREF(value);
		}
		else
		{
			Py_DECREF(values);
			PyErr_Format(PyExc_ValueError, "pgoutput: unexpected tuple column kind '%c'",
						 (int) kind);
			return NULL;
		}
		PyList_SET_ITEM(values, i, value);
	}
	*pos = at;
	return values;
}

/* decode_change(message) -> (relid, op, old, new) */
static PyObject *
decode_change(PyObject *self, PyObject *arg)
{
	Py_buffer	view;
	const unsigned char *buf;
	Py_ssize_t	len;
	Py_ssize_t	pos = 6;
	PyObject   *op;
	PyObject   *old = NULL;
	PyObject   *new = NULL;
	PyObject   *result = NULL;
	unsigned char kind;
	unsigned char part;

	if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0)
		return NULL;
	buf = view.buf;
	len = view.len;
	if (len < 6)
	{
		malformed("a change message shorter than its header");
		goto done;
	}
	kind = buf[0];
	part = buf[5];
	if (kind == 'I')
	{
		op = op_insert;
		if (part != 'N')
		{
			malformed("an insert without its new tuple");
			goto done;
		}
		if ((new = tuple_data(buf, len, &pos)) == NULL)
			goto done;
	}
	else if (kind == 'D')
	{
		op = op_delete;
		if (part != 'K' && part != 'O')
		{
			malformed("a delete without its old tuple");
			goto done;
		}
		if ((old = tuple_data(buf, len, &pos)) == NULL)
			goto done;
	}
	else if (kind == 'U')
	{
		op = op_update;
		if (part == 'K' || part == 'O')
		{
			if ((old = tuple_data(buf, len, &pos)) == NULL)
				goto done;
			if (pos >= len || buf[pos] != 'N')
			{
				malformed("an update without its new tuple");
				goto done;
			}
			pos++;
		}
		else if (part != 'N')
		{
			malformed("an update without its new tuple");
			goto done;
		}
		if ((new = tuple_data(buf, len, &pos)) == NULL)
			goto done;
	}
	else
	{
		malformed("not a change message");
		goto done;
	}
	result = Py_BuildValue("(kOOO)", (unsigned long) be32(buf + 1), op,
						   old ? old : Py_None, new ? new : Py_None);
done:
	Py_XDECREF(old);
	Py_XDECREF(new);
	PyBuffer_Release(&view);
	return result;
}

static PyMethodDef methods[] = {
	{"decode_change", decode_change, METH_O,
	 "decode_change(message) -> (relid, op, old, new): a pgoutput Insert, Update or Delete."},
	{NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_pgoutput", NULL, -1, methods
};

PyMODINIT_FUNC
PyInit__pgoutput(void)
{
	PyObject   *m = PyModule_Create(&module);

	if (m == NULL)
		return NULL;
	null_value = PyBytes_FromStringAndSize("\\N", 2);
	unchanged_value = PyBytes_FromStringAndSize("\\u", 2);
	op_insert = PyUnicode_InternFromString("I");
	op_update = PyUnicode_InternFromString("U");
	op_delete = PyUnicode_InternFromString("D");
	if (!null_value || !unchanged_value || !op_insert || !op_update || !op_delete)
	{
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
