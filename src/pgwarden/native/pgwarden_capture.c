/*
 * pgwarden_capture: the compiled capture trigger.
 *
 * The same job as the PL/pgSQL capture functions pgwarden generates per table (history/
 * capture.sql), writing the same rows: for each INSERT, UPDATE or DELETE statement on a tracked
 * table, one row per changed row into the table's history table (pgwarden.rows_<id>), holding
 * the context id, the statement id, the operation and native copies of the old and new row.
 *
 * Why C: on a one-row statement PL/pgSQL's per-call set-up and the executor start-up of its
 * INSERT are most of the cost of capture (docs/benchmarks.md). Here each statement costs one
 * sequence value, one relation open and one heap and index insert per row: no parsing, no
 * planning, no executor start-up, no JSON.
 *
 * Everything per table arrives as trigger arguments, written by pgwarden.track():
 *   0  history table oid
 *   1  tx table oid (who and when, one row per transaction and context)
 *   2  statement sequence oid
 *   3  mode: "fail-closed" or "fail-open"
 *   4  statement table oid, or 0 when statement text is not recorded
 *   5  columns: "natts;attnum:typid:old_slot:new_slot,..." (slots are attribute numbers of the
 *      history table; a column not listed is not captured)
 * The arguments are checked against the table's row type on every statement: a table changed
 * behind pgwarden's back is refused (fail-closed) or counted (fail-open), never mis-recorded.
 *
 * The context row (who, when) is written once per transaction and again only when the acting
 * role, application name, pgwarden.actor or pgwarden.context change. It is remembered in backend
 * memory, forgotten at transaction end and when the subtransaction that wrote it aborts.
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/execnodes.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/xid8.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(pgwarden_capture);
PG_FUNCTION_INFO_V1(pgwarden_capture_version);

/* The interface version: pgwarden checks it before it creates triggers that use this library. */
#define CAPTURE_VERSION 1

/* Fixed leading columns of every history table. */
#define COL_CTX 1
#define COL_STMT 2
#define COL_OP 3

/* tx table columns, in order. */
#define TX_NATTS 9

typedef struct SlotMap
{
	AttrNumber	attnum;			/* column of the tracked table */
	Oid			typid;			/* its type when the arguments were written */
	AttrNumber	old_slot;		/* history table column for the old value */
	AttrNumber	new_slot;		/* and for the new value */
} SlotMap;

typedef struct CaptureArgs
{
	Oid			history;
	Oid			txrel;
	Oid			seq;
	Oid			stmtrel;
	bool		fail_open;
	int			natts;
	int			nmaps;
	SlotMap    *maps;
} CaptureArgs;

/* The current context row, remembered for the rest of the transaction. */
typedef struct ContextCache
{
	bool		valid;
	FullTransactionId fxid;
	SubTransactionId subid;		/* the subtransaction that wrote it (moves up as they commit) */
	Oid			txrel;
	int64		id;
	Oid			session_user;
	char	   *role;			/* the "role" setting as read: "none" or a role's name */
	char	   *application;
	char	   *actor;
	char	   *context;
} ContextCache;

static ContextCache ctx_cache;
static bool callbacks_registered = false;

/* Rows of one statement are written this many at a time (table_multi_insert, as COPY does:
 * one WAL record per page instead of one per row). */
#define BATCH_ROWS 1000

/* A relation opened for inserting: the executor pieces index maintenance needs. */
typedef struct Target
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	/* batching, for statements of more than one row */
	TupleTableSlot **batch;
	int			nbatch;
	BulkInsertState bistate;
} Target;

static void
forget_context(void)
{
	ctx_cache.valid = false;
}

static void
xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			forget_context();
			break;
		default:
			break;
	}
}

static void
subxact_callback(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	if (!ctx_cache.valid || ctx_cache.subid != mySubid)
		return;
	if (event == SUBXACT_EVENT_ABORT_SUB)
		forget_context();		/* the row it wrote is gone with it */
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		ctx_cache.subid = parentSubid;	/* the row now lives or dies with the parent */
}

static Oid
parse_oid(const char *text, const char *what)
{
	char	   *end;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 10);
	if (errno != 0 || *end != '\0' || end == text)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pgwarden capture: bad %s argument \"%s\"", what, text),
				 errhint("run pgwarden apply to rewrite the capture triggers")));
	return (Oid) value;
}

static long
parse_number(const char **p, char stop, const char *whole)
{
	char	   *end;
	long		value;

	errno = 0;
	value = strtol(*p, &end, 10);
	if (errno != 0 || end == *p || (*end != stop && !(stop == ',' && *end == '\0')))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pgwarden capture: bad column map \"%s\"", whole),
				 errhint("run pgwarden apply to rewrite the capture triggers")));
	*p = end;
	if (**p != '\0')
		(*p)++;
	return value;
}

/*
 * Parsed arguments of the triggers seen in this backend, found again by the argument strings
 * themselves (a changed trigger has other strings, so nothing can go stale).
 */
#define ARGS_CACHE 64
typedef struct CachedArgs
{
	Oid			tgoid;
	char	   *text[6];
	CaptureArgs args;
} CachedArgs;
static CachedArgs args_cache[ARGS_CACHE];

static void parse_args(Trigger *trigger, CaptureArgs *args);

static void
cached_args(Trigger *trigger, CaptureArgs *args)
{
	CachedArgs *slot = &args_cache[trigger->tgoid % ARGS_CACHE];
	int			i;
	bool		hit = slot->tgoid == trigger->tgoid && trigger->tgnargs == 6;

	for (i = 0; hit && i < 6; i++)
		hit = strcmp(slot->text[i], trigger->tgargs[i]) == 0;
	if (hit)
	{
		*args = slot->args;
		return;
	}
	parse_args(trigger, args);	/* in the caller's memory: raises on bad arguments */
	if (slot->tgoid != InvalidOid)
	{
		for (i = 0; i < 6; i++)
			pfree(slot->text[i]);
		pfree(slot->args.maps);
		slot->tgoid = InvalidOid;
	}
	for (i = 0; i < 6; i++)
		slot->text[i] = MemoryContextStrdup(TopMemoryContext, trigger->tgargs[i]);
	slot->args = *args;
	slot->args.maps = MemoryContextAlloc(TopMemoryContext, sizeof(SlotMap) * Max(args->nmaps, 1));
	memcpy(slot->args.maps, args->maps, sizeof(SlotMap) * args->nmaps);
	slot->tgoid = trigger->tgoid;
}

static void
parse_args(Trigger *trigger, CaptureArgs *args)
{
	const char *p;
	const char *map;
	int			capacity;

	if (trigger->tgnargs != 6)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pgwarden capture: trigger \"%s\" has %d arguments, expected 6",
						trigger->tgname, trigger->tgnargs),
				 errhint("run pgwarden apply to rewrite the capture triggers")));
	args->history = parse_oid(trigger->tgargs[0], "history table");
	args->txrel = parse_oid(trigger->tgargs[1], "tx table");
	args->seq = parse_oid(trigger->tgargs[2], "sequence");
	args->fail_open = strcmp(trigger->tgargs[3], "fail-open") == 0;
	args->stmtrel = parse_oid(trigger->tgargs[4], "statement table");

	map = trigger->tgargs[5];
	p = map;
	args->natts = (int) parse_number(&p, ';', map);
	capacity = Max(args->natts, 1);
	args->maps = palloc(sizeof(SlotMap) * capacity);
	args->nmaps = 0;
	while (*p != '\0')
	{
		SlotMap    *m;

		if (args->nmaps >= capacity)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("pgwarden capture: column map \"%s\" lists more columns than the table has",
							map)));
		m = &args->maps[args->nmaps++];
		m->attnum = (AttrNumber) parse_number(&p, ':', map);
		m->typid = (Oid) parse_number(&p, ':', map);
		m->old_slot = (AttrNumber) parse_number(&p, ':', map);
		m->new_slot = (AttrNumber) parse_number(&p, ',', map);
	}
}

/*
 * The column map must describe the table as it is now: same number of attributes, and every
 * mapped column still there with the type it had. Otherwise a column was added, dropped or
 * retyped without pgwarden refreshing the map (its DDL event trigger missing).
 */
static void
check_shape(Relation rel, const CaptureArgs *args, TupleDesc history)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			i;
	bool		ok = desc->natts == args->natts;

	for (i = 0; ok && i < args->nmaps; i++)
	{
		const SlotMap *m = &args->maps[i];
		Form_pg_attribute att;

		if (m->attnum < 1 || m->attnum > desc->natts ||
			m->old_slot < 1 || m->old_slot > history->natts ||
			m->new_slot < 1 || m->new_slot > history->natts)
		{
			ok = false;
			break;
		}
		att = TupleDescAttr(desc, m->attnum - 1);
		if (att->attisdropped || att->atttypid != m->typid)
			ok = false;
		else
		{
			/* History stores a domain as its base type: the same bytes. */
			Oid			stored = TupleDescAttr(history, m->old_slot - 1)->atttypid;

			if (stored != att->atttypid && stored != getBaseType(att->atttypid))
				ok = false;
			if (TupleDescAttr(history, m->new_slot - 1)->atttypid != stored)
				ok = false;
		}
	}
	/* Every live column of the table must be either mapped or deliberately left out: an
	 * added column is caught here because natts grew. */
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pgwarden: the columns of %s.%s changed but its capture was not updated",
						get_namespace_name(RelationGetNamespace(rel)),
						RelationGetRelationName(rel)),
				 errhint("run pgwarden apply (the DDL event trigger that does this by itself is missing)")));
}

static void
open_target(Target *t, Oid relid)
{
	t->rel = table_open(relid, RowExclusiveLock);
	t->estate = CreateExecutorState();
	t->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(t->rri, t->rel, 1, NULL, 0);
	ExecOpenIndices(t->rri, false);
	t->slot = ExecInitExtraTupleSlot(t->estate, RelationGetDescr(t->rel), &TTSOpsHeapTuple);
	t->batch = NULL;
	t->nbatch = 0;
	t->bistate = NULL;
}

static void
start_batch(Target *t)
{
	int			i;

	t->batch = palloc(sizeof(TupleTableSlot *) * BATCH_ROWS);
	for (i = 0; i < BATCH_ROWS; i++)
		t->batch[i] = ExecInitExtraTupleSlot(t->estate, RelationGetDescr(t->rel), &TTSOpsHeapTuple);
	t->bistate = GetBulkInsertState();
}

/* Write the batched rows: heap first, many per page, then each row's index entries. */
static void
flush_batch(Target *t)
{
	int			i;

	if (t->nbatch == 0)
		return;
	table_multi_insert(t->rel, t->batch, t->nbatch, GetCurrentCommandId(true), 0, t->bistate);
	for (i = 0; i < t->nbatch; i++)
	{
		if (t->rri->ri_NumIndices > 0)
#if PG_VERSION_NUM >= 160000
			ExecInsertIndexTuples(t->rri, t->batch[i], t->estate, false, false, NULL, NIL, false);
#else
			ExecInsertIndexTuples(t->rri, t->batch[i], t->estate, false, false, NULL, NIL);
#endif
		ExecClearTuple(t->batch[i]);
		ResetPerTupleExprContext(t->estate);
	}
	t->nbatch = 0;
}

static void
close_target(Target *t)
{
	flush_batch(t);
	if (t->bistate != NULL)
		FreeBulkInsertState(t->bistate);
	ExecCloseIndices(t->rri);
	ExecResetTupleTable(t->estate->es_tupleTable, false);
	FreeExecutorState(t->estate);
	table_close(t->rel, NoLock);	/* the lock is kept until the transaction ends */
}

/* One row into the target: heap, then every index (expression and partial ones included);
 * into the batch instead when there is one. */
static void
insert_row(Target *t, Datum *values, bool *nulls)
{
	HeapTuple	tuple = heap_form_tuple(RelationGetDescr(t->rel), values, nulls);

	if (t->batch != NULL)
	{
		ExecStoreHeapTuple(tuple, t->batch[t->nbatch++], true);
		if (t->nbatch == BATCH_ROWS)
			flush_batch(t);
		return;
	}
	ExecStoreHeapTuple(tuple, t->slot, true);
	table_tuple_insert(t->rel, t->slot, GetCurrentCommandId(true), 0, NULL);
	if (t->rri->ri_NumIndices > 0)
#if PG_VERSION_NUM >= 160000
		ExecInsertIndexTuples(t->rri, t->slot, t->estate, false, false, NULL, NIL, false);
#else
		ExecInsertIndexTuples(t->rri, t->slot, t->estate, false, false, NULL, NIL);
#endif
	ExecClearTuple(t->slot);
	ResetPerTupleExprContext(t->estate);
}

static char *
setting(const char *name)
{
	const char *value = GetConfigOption(name, true, false);

	return (value == NULL || value[0] == '\0') ? NULL : (char *) value;
}

static bool
same_text(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

static char *
keep(const char *value)
{
	return value == NULL ? NULL : MemoryContextStrdup(TopMemoryContext, value);
}

static void
drop(char **value)
{
	if (*value != NULL)
		pfree(*value);
	*value = NULL;
}

static Datum
text_or_null(const char *value, bool *isnull)
{
	*isnull = value == NULL;
	return value == NULL ? (Datum) 0 : CStringGetTextDatum(value);
}

/* The role whose privileges apply outside any SECURITY DEFINER function: SET ROLE if used,
 * else the login role (pgwarden.acting_role() in SQL). `role` is the "role" setting. */
static char *
acting_role(const char *role)
{
	if (role == NULL || strcmp(role, "none") == 0)
		return GetUserNameFromId(GetSessionUserId(), false);
	return pstrdup(role);
}

/* The context id for this statement: the cached one, or a new tx row whose id is `stmt`. */
static int64
context_id(const CaptureArgs *args, int64 stmt)
{
	FullTransactionId fxid = GetTopFullTransactionId();
	const char *role = GetConfigOption("role", false, false);
	Oid			session_user = GetSessionUserId();
	char	   *application = setting("application_name");
	char	   *actor = setting("pgwarden.actor");
	char	   *context = setting("pgwarden.context");
	Target		t;
	Datum		values[TX_NATTS];
	bool		nulls[TX_NATTS];

	if (ctx_cache.valid &&
		FullTransactionIdEquals(ctx_cache.fxid, fxid) &&
		ctx_cache.txrel == args->txrel &&
		ctx_cache.session_user == session_user &&
		same_text(ctx_cache.role, role) &&
		same_text(ctx_cache.application, application) &&
		same_text(ctx_cache.actor, actor) &&
		same_text(ctx_cache.context, context))
		return ctx_cache.id;

	memset(nulls, 0, sizeof(nulls));
	values[0] = Int64GetDatum(stmt);
	values[1] = Int64GetDatum((int64) U64FromFullTransactionId(fxid));
	values[2] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	values[3] = CStringGetTextDatum(GetUserNameFromId(session_user, false));
	values[4] = CStringGetTextDatum(acting_role(role));
	values[5] = text_or_null(application, &nulls[5]);
	{
		LOCAL_FCINFO(fcinfo, 0);

		InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
		values[6] = inet_client_addr(fcinfo);
		nulls[6] = fcinfo->isnull;
	}
	values[7] = text_or_null(actor, &nulls[7]);
	values[8] = text_or_null(context, &nulls[8]);

	open_target(&t, args->txrel);
	if (RelationGetDescr(t.rel)->natts != TX_NATTS)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pgwarden capture: %s does not have the %d columns this library writes",
						RelationGetRelationName(t.rel), TX_NATTS),
				 errhint("install the pgwarden release that matches this library")));
	insert_row(&t, values, nulls);
	close_target(&t);

	drop(&ctx_cache.role);
	drop(&ctx_cache.application);
	drop(&ctx_cache.actor);
	drop(&ctx_cache.context);
	ctx_cache.role = keep(role);
	ctx_cache.application = keep(application);
	ctx_cache.actor = keep(actor);
	ctx_cache.context = keep(context);
	ctx_cache.fxid = fxid;
	ctx_cache.session_user = session_user;
	ctx_cache.subid = GetCurrentSubTransactionId();
	ctx_cache.txrel = args->txrel;
	ctx_cache.id = stmt;
	ctx_cache.valid = true;
	return stmt;
}

static void
record_statement(const CaptureArgs *args, int64 stmt, int64 ctx)
{
	Target		t;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	values[0] = Int64GetDatum(stmt);
	values[1] = Int64GetDatum(ctx);
	values[2] = TimestampTzGetDatum(GetCurrentStatementStartTimestamp());
	values[3] = text_or_null(debug_query_string, &nulls[3]);
	open_target(&t, args->stmtrel);
	insert_row(&t, values, nulls);
	close_target(&t);
}

/* Copy the mapped columns of one side of a change into the history row. */
static void
copy_side(const CaptureArgs *args, TupleTableSlot *src, bool old_side, Datum *values, bool *nulls)
{
	int			i;

	slot_getallattrs(src);
	for (i = 0; i < args->nmaps; i++)
	{
		const SlotMap *m = &args->maps[i];
		int			slot = (old_side ? m->old_slot : m->new_slot) - 1;

		values[slot] = src->tts_values[m->attnum - 1];
		nulls[slot] = src->tts_isnull[m->attnum - 1];
	}
}

/* An UPDATE that left every captured column as it was (byte for byte) records nothing. */
static bool
unchanged(const CaptureArgs *args, TupleTableSlot *o, TupleTableSlot *n, TupleDesc desc)
{
	int			i;

	slot_getallattrs(o);
	slot_getallattrs(n);
	for (i = 0; i < args->nmaps; i++)
	{
		int			a = args->maps[i].attnum - 1;
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (o->tts_isnull[a] != n->tts_isnull[a])
			return false;
		if (!o->tts_isnull[a] &&
			!datum_image_eq(o->tts_values[a], n->tts_values[a], att->attbyval, att->attlen))
			return false;
	}
	return true;
}

static void
capture(TriggerData *trigdata, const CaptureArgs *args)
{
	Relation	rel = trigdata->tg_relation;
	TupleDesc	desc = RelationGetDescr(rel);
	char		op;
	Tuplestorestate *olds = NULL;
	Tuplestorestate *news = NULL;
	TupleTableSlot *os = NULL;
	TupleTableSlot *ns = NULL;
	Target		t;
	TupleDesc	hdesc;
	Datum	   *values;
	bool	   *nulls;
	int64		stmt;
	int64		ctx;
	int			i;

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
	{
		op = 'I';
		news = trigdata->tg_newtable;
	}
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		op = 'U';
		olds = trigdata->tg_oldtable;
		news = trigdata->tg_newtable;
	}
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
	{
		op = 'D';
		olds = trigdata->tg_oldtable;
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgwarden capture handles INSERT, UPDATE and DELETE only")));
	if ((op != 'I' && olds == NULL) || (op != 'D' && news == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgwarden capture needs its transition tables (REFERENCING OLD/NEW TABLE)")));

	/* A statement that changed no row records nothing, not even who ran it. */
	if (olds != NULL && tuplestore_tuple_count(olds) == 0)
		return;
	if (olds == NULL && tuplestore_tuple_count(news) == 0)
		return;

	open_target(&t, args->history);
	hdesc = RelationGetDescr(t.rel);
	check_shape(rel, args, hdesc);

	stmt = nextval_internal(args->seq, false);
	ctx = context_id(args, stmt);
	if (OidIsValid(args->stmtrel))
		record_statement(args, stmt, ctx);

	values = palloc(sizeof(Datum) * hdesc->natts);
	nulls = palloc(sizeof(bool) * hdesc->natts);
	if (tuplestore_tuple_count(olds != NULL ? olds : news) > 1)
		start_batch(&t);
	if (olds != NULL)
	{
		os = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
		tuplestore_rescan(olds);
	}
	if (news != NULL)
	{
		ns = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
		tuplestore_rescan(news);
	}
	/*
	 * An UPDATE's transition tables hold the old and the new image of each row at the same
	 * position (PostgreSQL appends both when it updates the row), even when the update changed
	 * the row's key: reading them in step pairs them.
	 */
	for (;;)
	{
		bool		have_old = os != NULL && tuplestore_gettupleslot(olds, true, false, os);
		bool		have_new = ns != NULL && tuplestore_gettupleslot(news, true, false, ns);

		if (!have_old && !have_new)
			break;
		if ((os != NULL && !have_old) || (ns != NULL && !have_new))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("pgwarden capture: the old and new rows of an UPDATE do not pair up")));
		CHECK_FOR_INTERRUPTS();
		if (op == 'U' && unchanged(args, os, ns, desc))
			continue;
		for (i = 0; i < hdesc->natts; i++)
			nulls[i] = true;
		values[COL_CTX - 1] = Int64GetDatum(ctx);
		nulls[COL_CTX - 1] = false;
		values[COL_STMT - 1] = Int64GetDatum(stmt);
		nulls[COL_STMT - 1] = false;
		values[COL_OP - 1] = CharGetDatum(op);
		nulls[COL_OP - 1] = false;
		if (have_old)
			copy_side(args, os, true, values, nulls);
		if (have_new)
			copy_side(args, ns, false, values, nulls);
		insert_row(&t, values, nulls);
	}
	if (os != NULL)
		ExecDropSingleTupleTableSlot(os);
	if (ns != NULL)
		ExecDropSingleTupleTableSlot(ns);
	close_target(&t);
}

/*
 * fail-open: the statement goes on without its history; say so and count it, in
 * capture_failure (written directly, as history is: the writer needs no rights on it, and
 * nobody else can add rows there).
 */
static void
note_failure(TriggerData *trigdata, const CaptureArgs *args, ErrorData *edata)
{
	Relation	rel = trigdata->tg_relation;
	const char *op = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ? "INSERT" :
		TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ? "UPDATE" : "DELETE";
	const char *nsp = get_namespace_name(RelationGetNamespace(rel));
	Oid			failures = get_relname_relid("capture_failure", get_rel_namespace(args->history));
	Target		t;
	Oid			seq;
	Datum		values[9];
	bool		nulls[9];

	ereport(WARNING,
			(errmsg("pgwarden: history of %s on %s.%s was not recorded: %s", op, nsp,
					RelationGetRelationName(rel), edata->message ? edata->message : ""),
			 errhint("fail-open mode: the change itself went through; see pgwarden verify")));
	if (!OidIsValid(failures))
		ReThrowError(edata);
	open_target(&t, failures);
	if (RelationGetDescr(t.rel)->natts != 9)
		ReThrowError(edata);
#if PG_VERSION_NUM >= 170000
	seq = getIdentitySequence(t.rel, 1, false);
#else
	seq = getIdentitySequence(failures, 1, false);
#endif
	memset(nulls, 0, sizeof(nulls));
	values[0] = Int64GetDatum(nextval_internal(seq, false));
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
	values[2] = FullTransactionIdGetDatum(GetTopFullTransactionId());
	values[3] = ObjectIdGetDatum(RelationGetRelid(rel));
	values[4] = CStringGetTextDatum(nsp);
	values[5] = CStringGetTextDatum(RelationGetRelationName(rel));
	values[6] = CStringGetTextDatum(op);
	values[7] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));
	values[8] = text_or_null(edata->message, &nulls[8]);
	insert_row(&t, values, nulls);
	close_target(&t);
}

Datum
pgwarden_capture(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	CaptureArgs args;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgwarden capture must be called as a trigger")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgwarden capture must run AFTER ... FOR EACH STATEMENT")));
	if (!callbacks_registered)
	{
		RegisterXactCallback(xact_callback, NULL);
		RegisterSubXactCallback(subxact_callback, NULL);
		callbacks_registered = true;
	}
	cached_args(trigdata->tg_trigger, &args);

	if (!args.fail_open)
	{
		capture(trigdata, &args);
		return PointerGetDatum(NULL);
	}

	/*
	 * fail-open: one subtransaction around the whole statement's capture (as a PL/pgSQL
	 * EXCEPTION block would be), never one per row.
	 */
	{
		MemoryContext oldcontext = CurrentMemoryContext;
		ResourceOwner oldowner = CurrentResourceOwner;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcontext);
		PG_TRY();
		{
			capture(trigdata, &args);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(oldcontext);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			/* Query cancels and shutdowns are not capture failures. */
			if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED ||
				edata->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN)
				ReThrowError(edata);
			note_failure(trigdata, &args, edata);
			FreeErrorData(edata);
		}
		PG_END_TRY();
	}
	return PointerGetDatum(NULL);
}

Datum
pgwarden_capture_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(CAPTURE_VERSION);
}
