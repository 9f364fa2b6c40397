/* The target's gathered-write run in C (issue 7): the same work as connection.py's
 * ``_scsi_command_fast`` + ``LogicalUnit.gather_offset`` + ``_gather_write`` for each SCSI Command PDU in a
 * row that continues a gathered write, without the Python bytecode per command.
 *
 * ``TargetConnection._process`` calls ``gather_run`` for one logical unit, once ``LogicalUnit.gather_limits``
 * has said that unit takes gathered writes now (nothing about that changes within one receive), with no
 * header or data digests, no command held for CmdSN order and room in the command window: to start a gather
 * (``gather_end`` -1: the first write may go anywhere) or to continue the open one.
 * The run takes PDUs from ``pos`` while each one is, exactly as the Python path would accept it:
 *
 *   - whole in the buffer, no AHS, a data segment within ``max_dsl`` (MaxRecvDataSegmentLength and the
 *     immediate-data limit, the smaller);
 *   - a SCSI Command (opcode 01h), not immediate, CmdSN == ExpCmdSN, a task tag neither in ``tasks`` nor in
 *     ``running``, W set, data segment == ExpectedDataTransferLength != 0;
 *   - for the same LUN field as the gather's;
 *   - WRITE(10) or WRITE(16) with no byte-1 bit in 0xED (protection, DPO, FUA, reserved), group number bits
 *     7-5 clear, no reserved or NACA/LINK bit in CONTROL, a transfer length > 0 and <= ``max_blocks``,
 *     LBA + length <= ``num_blocks``, the data exactly length x ``block_size`` bytes;
 *   - at the byte offset where the gather ends (any, to start one), with room left in it.
 *
 * The first PDU that is anything else stops the run, untouched: the Python path takes it.  For each PDU
 * taken it appends the data (a slice of ``view``, still in the receive buffer: the caller writes the
 * gather before the buffer is reused), a GOOD SCSI Response (the bytes ``pdu.pack_hot`` makes: StatSN,
 * ExpCmdSN after this command, MaxCmdSN = that ExpCmdSN + ``slack``, all modulo 2**32) to ``out`` and the
 * (mark, 1, ITT, EDTL, CDB) record ``_flush_gather`` needs if the write fails.
 *
 * Returns (pos, commands taken, StatSN, ExpCmdSN, byte offset of the first write taken or -1, gather end),
 * after the run. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | (uint64_t)be32(p + 4);
}

static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* 1: in the dict; 0: not; -1: error set. */
static int has_tag(PyObject *dict, uint32_t itt) {
    if (PyDict_GET_SIZE(dict) == 0)
        return 0;
    PyObject *key = PyLong_FromUnsignedLong(itt);
    if (key == NULL)
        return -1;
    int found = PyDict_Contains(dict, key);
    Py_DECREF(key);
    return found;
}

/* gather_run(view, pos, end, max_dsl, expcmdsn, slack, tasks, running, lun_field, num_blocks, block_size,
 *            max_blocks, gather_end, room, statsn, pieces, out, commands); view: a memoryview of the receive
 *            buffer (bytes, C-contiguous), which the pieces taken are slices of. */
static PyObject *gather_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 18) {
        PyErr_Format(PyExc_TypeError, "gather_run takes 18 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *view = args[0];
    PyObject *tasks = args[6], *running = args[7], *lun_field = args[8];
    PyObject *pieces = args[15], *out = args[16], *commands = args[17];
    if (!PyMemoryView_Check(view) || !PyDict_Check(tasks) || !PyDict_Check(running) || !PyBytes_Check(lun_field)
            || PyBytes_GET_SIZE(lun_field) != 8 || !PyList_Check(pieces) || !PyList_Check(out)
            || !PyList_Check(commands)) {
        PyErr_SetString(PyExc_TypeError, "gather_run: view must be a memoryview, tasks and running dicts, "
                                         "lun_field 8 bytes, pieces, out and commands lists");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_dsl = PyLong_AsSsize_t(args[3]);
    unsigned long expcmdsn_l = PyLong_AsUnsignedLong(args[4]);
    unsigned long slack_l = PyLong_AsUnsignedLong(args[5]);
    unsigned long long num_blocks = PyLong_AsUnsignedLongLong(args[9]);
    long long block_size = PyLong_AsLongLong(args[10]);
    unsigned long long max_blocks = PyLong_AsUnsignedLongLong(args[11]);
    long long gather_end = PyLong_AsLongLong(args[12]);
    Py_ssize_t room = PyLong_AsSsize_t(args[13]);
    unsigned long statsn_l = PyLong_AsUnsignedLong(args[14]);
    if (PyErr_Occurred())
        return NULL;
    if (expcmdsn_l > 0xFFFFFFFFUL || slack_l > 0xFFFFFFFFUL || statsn_l > 0xFFFFFFFFUL || block_size <= 0
            || pos < 0 || end < pos || max_dsl < 0 || gather_end < -1) {
        PyErr_SetString(PyExc_ValueError, "gather_run: a sequence number, block size or position out of range");
        return NULL;
    }
    uint32_t expcmdsn = (uint32_t)expcmdsn_l, slack = (uint32_t)slack_l, statsn = (uint32_t)statsn_l;

    Py_buffer buffer;
    if (PyObject_GetBuffer(view, &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    if (end > buffer.len) {
        PyBuffer_Release(&buffer);
        PyErr_SetString(PyExc_ValueError, "gather_run: end is past the buffer");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)buffer.buf;
    const unsigned char *lun = (const unsigned char *)PyBytes_AS_STRING(lun_field);
    Py_ssize_t taken = 0;
    long long first = -1;
    int failed = 0;

    while (room > 0 && end - pos >= 48) {
        const unsigned char *bhs = buf + pos;
        /* TotalAHSLength and DataSegmentLength as one word: any AHS makes it larger than max_dsl. */
        uint32_t dsl = be32(bhs + 4);
        if ((Py_ssize_t)dsl > max_dsl || dsl == 0)
            break;
        Py_ssize_t total = 48 + (((Py_ssize_t)dsl + 3) & ~(Py_ssize_t)3);
        if (end - pos < total)
            break;
        /* byte 0: SCSI Command, not immediate (bit 7 is not looked at, as in the Python path); byte 1: W */
        if ((bhs[0] & 0x3F) != 0x01 || (bhs[0] & 0x40) || !(bhs[1] & 0x20))
            break;
        if (memcmp(bhs + 8, lun, 8) != 0)
            break;
        uint32_t itt = be32(bhs + 16), edtl = be32(bhs + 20), cmdsn = be32(bhs + 24);
        if (cmdsn != expcmdsn || edtl != dsl)
            break;
        const unsigned char *cdb = bhs + 32;
        uint64_t lba, count;
        unsigned flags = cdb[1], group, control;
        if (cdb[0] == 0x2A) {  /* WRITE(10): opcode, byte 1, LBA (4), group, length (2), control */
            lba = be32(cdb + 2);
            group = cdb[6];
            count = ((uint64_t)cdb[7] << 8) | cdb[8];
            control = cdb[9];
        } else if (cdb[0] == 0x8A) {  /* WRITE(16): opcode, byte 1, LBA (8), length (4), group, control */
            lba = be64(cdb + 2);
            count = be32(cdb + 10);
            group = cdb[14];
            control = cdb[15];
        } else {
            break;
        }
        if ((flags & 0xED) || (group & 0xE0) || (control & 0x3D) || count == 0 || count > max_blocks
                || lba > num_blocks || count > num_blocks - lba
                || (unsigned long long)dsl != count * (unsigned long long)block_size)
            break;
        /* byte offset: lba < num_blocks, so lba * block_size is the volume's size at most */
        long long offset = (long long)(lba * (uint64_t)block_size);
        if (gather_end >= 0 && offset != gather_end)
            break;
        int found = has_tag(tasks, itt);
        if (found == 0)
            found = has_tag(running, itt);
        if (found != 0) {
            failed = found < 0;
            break;
        }

        PyObject *piece = PySequence_GetSlice(view, pos + 48, pos + 48 + (Py_ssize_t)dsl);
        if (piece == NULL) {
            failed = 1;
            break;
        }
        PyObject *response = PyBytes_FromStringAndSize(NULL, 48);
        PyObject *cdb_bytes = PyBytes_FromStringAndSize((const char *)cdb, 16);
        Py_ssize_t mark = PyList_GET_SIZE(out);
        PyObject *record = NULL;
        if (response != NULL && cdb_bytes != NULL)
            record = Py_BuildValue("(nnkkO)", mark, (Py_ssize_t)1, (unsigned long)itt, (unsigned long)edtl,
                                   cdb_bytes);
        if (record == NULL) {
            Py_DECREF(piece);
            Py_XDECREF(response);
            Py_XDECREF(cdb_bytes);
            failed = 1;
            break;
        }
        unsigned char *r = (unsigned char *)PyBytes_AS_STRING(response);
        memset(r, 0, 48);
        r[0] = 0x21;  /* SCSI Response */
        r[1] = 0x80;  /* F; response 0 (command completed), status GOOD, no data segment, no LUN */
        put32(r + 16, itt);
        put32(r + 24, statsn);
        put32(r + 28, expcmdsn + 1);  /* this command's CmdSN is taken */
        put32(r + 32, expcmdsn + 1 + slack);
        Py_ssize_t had_pieces = PyList_GET_SIZE(pieces), had_commands = PyList_GET_SIZE(commands);
        int appended = PyList_Append(pieces, piece) == 0 && PyList_Append(out, response) == 0
            && PyList_Append(commands, record) == 0;
        Py_DECREF(piece);
        Py_DECREF(response);
        Py_DECREF(cdb_bytes);
        Py_DECREF(record);
        if (!appended) {  /* out of memory: take back what this command appended, then raise */
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            if (PyList_GET_SIZE(pieces) > had_pieces)
                PyList_SetSlice(pieces, had_pieces, PyList_GET_SIZE(pieces), NULL);
            if (PyList_GET_SIZE(out) > mark)
                PyList_SetSlice(out, mark, PyList_GET_SIZE(out), NULL);
            if (PyList_GET_SIZE(commands) > had_commands)
                PyList_SetSlice(commands, had_commands, PyList_GET_SIZE(commands), NULL);
            PyErr_Restore(type, value, traceback);
            failed = 1;
            break;
        }
        if (taken == 0)
            first = offset;
        statsn += 1;
        expcmdsn += 1;
        gather_end = offset + (long long)dsl;
        room -= 1;
        pos += total;
        taken += 1;
    }
    PyBuffer_Release(&buffer);
    if (failed)
        return NULL;
    return Py_BuildValue("(nnkkLL)", pos, taken, (unsigned long)statsn, (unsigned long)expcmdsn, first,
                         gather_end);
}

static PyMethodDef methods[] = {
    {"gather_run", (PyCFunction)(void (*)(void))gather_run, METH_FASTCALL,
     "gather_run(view, pos, end, max_dsl, expcmdsn, slack, tasks, running, lun_field, num_blocks, "
     "block_size, max_blocks, gather_end, room, statsn, pieces, out, commands) -> "
     "(pos, taken, statsn, expcmdsn, first offset, gather end)\n\n"
     "Continue a gathered write over the SCSI Command PDUs that follow (see _fastpath.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "node_agent.iscsi._fastpath",
    "The target's hot loop for gathered 4 KiB writes, in C (connection.py falls back to Python without it).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    return PyModule_Create(&module_def);
}
