/* sd.c: run a SpikeDecoder model (spiking, event-driven) or its ANN twin from one exported file.

   Build: make -C runtime        Run: runtime/sd model.bin -p "ROMEO:" -n 200 -t 0.8 -s 0

   One file, read top to bottom: the file format reader, the spiking model (LIF neurons, event Linears that add the
   weight rows of their active inputs, window heads and whole-context heads), the ANN twin (GEMV, softmax attention
   with a KV cache), the sampler, the energy counter and the command line. C99, libc and libm only.

   The arithmetic follows the PyTorch model (spikedecoder/model.py and its incremental decoding): a token is
   presented for T steps; LIF neurons integrate over the T steps of one token only; tokens mix through attention
   (and the short causal token convolutions: conv_mode "full" widens a Linear's input to the last K tokens, "channel"
   mixes its outputs over them channel by channel). Spike counts are small integers, exact in float32, so the attention
   state sums are exact; Linears sum floats in their own order (spikes at a threshold can then differ by an ulp). */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/* ------------------------------------------------------------------------------------------------ file format */
#define MAGIC "SDRT"
#define END_MAGIC "SDND"
#define VERSION 2
enum { /* the config integers, in file order (spikedecoder/export.py INT_FIELDS) */
    KIND, VOCAB, MAX_LEN, N_LAYER, N_HEAD, N_EMBD, HIDDEN, STEPS, EMBED, TOK_WIDTH, TOKEN_CONV, KEY_WIDTH,
    MLP_CONV, CONV_MODE, SPIKE_LEVELS, QKV_LEVELS, BIPOLAR, ATTN_POWER, COINCIDENCE_NORM, NORM, AV_NORM,
    HEAD_COMBINE, LEARNED_DECAY, DECAY_INPUT, FIRST_IN_LIF, N_INTS
};
enum { F_TAU, F_SCALE, F_EPS, N_FLOATS };
enum { SPIKING = 0, ANN = 1 };

static void die(const char *what, const char *detail) {
    fprintf(stderr, "error: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

typedef struct {
    const unsigned char *data;
    size_t size, at;
    const char *path;
} Reader;

static void need(Reader *r, size_t n, const char *what) {
    if (n > r->size - r->at) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s is truncated or corrupt (ends inside %s at byte %zu of %zu); export it again "
                 "with `spikedecoder export`", r->path, what, r->at, r->size);
        die(msg, NULL);
    }
}

static uint32_t read_u32(Reader *r, const char *what) {
    need(r, 4, what);
    const unsigned char *p = r->data + r->at;
    r->at += 4;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static float read_f32(Reader *r, const char *what) {
    uint32_t bits = read_u32(r, what);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* one array: its element count (checked against what the config implies), then float32 values, copied into an
   aligned buffer of our own */
static float *read_tensor(Reader *r, size_t expected, const char *what) {
    uint32_t n = read_u32(r, what);
    if (n != expected) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s is corrupt: %s has %u values where the header implies %zu", r->path, what,
                 n, expected);
        die(msg, NULL);
    }
    need(r, (size_t)n * 4, what);
    float *t = malloc(expected * sizeof(float) + 1);
    if (!t) die("out of memory reading", what);
    const uint32_t one = 1;
    if (*(const unsigned char *)&one == 1) {  /* a little-endian host: the bytes as they are */
        memcpy(t, r->data + r->at, expected * sizeof(float));
        r->at += expected * sizeof(float);
    } else {
        for (size_t i = 0; i < expected; i++) t[i] = read_f32(r, what);
    }
    return t;
}

/* ------------------------------------------------------------------------------------------------ the model */
typedef struct { float *th, *decay; } Lif;                 /* per channel threshold (and learned leak 1/tau) */
typedef struct {
    int in, out;
    float *rows, *bias, *lnw, *lnb;  /* rows: (in, out), input i's row at i*out */
    int conv;                        /* conv_mode "channel": its outputs' convolution width K (1: none) */
    float *taps, *past;              /* taps (K, out); past: the outputs of the last K-1 tokens [slot][t][out] */
} Lin;

typedef struct {
    Lif in_lif, q_lif, k_lif, v_lif, attn_lif, mlp_lif, hid_lif; /* spiking */
    int has_in_lif;
    Lin q, k, v, proj, fc1, fc2;
    float *av_a, *av_b;                       /* av_norm: affine (a, c) or LayerNorm (w, b) */
    float *ln1w, *ln1b, *ln2w, *ln2b;         /* ANN pre-norms */
    Lin qkv;                                  /* ANN */
} Layer;

typedef struct { int n; int *idx; float *cnt; } Active;   /* one (token, step)'s non-zero inputs and their counts */

typedef struct {
    int c[N_INTS];
    float tau, scale, eps, shift;  /* shift: 2^-k when tau = 2^k, else 0 */
    int *window;                   /* per head, 0 = whole context */
    int vocab_n;
    char (*vocab)[5];
    float *tok, *pos;              /* embedding tables */
    Layer *layers;
    Lif head_lif;
    Lin head;
    float *head_lnw, *head_lnb;
    /* sizes */
    int E, H, dh, T, L, hidden, V, sw, mw, wmax, feat, has_long;
    /* decoding state (preallocated, zeroed on reset) */
    int pos_now;
    Active *attn_hist, *mlp_hist;  /* [layer][slot][t]: the spikes the token convolutions read */
    float *attn_hist_dense, *mlp_hist_dense; /* ANN: [layer][slot][E] the normed inputs */
    float *kbuf, *vbuf;            /* spiking window heads [layer][slot][t][E]; ANN KV cache [layer][max_len][E] */
    float *kv, *z;                 /* whole-context heads [layer][t][head][feature][dh], [layer][t][head][feature] */
    /* scratch */
    float *x, *pre, *q, *k, *v, *y, *s, *hbuf, *logits, *vmem, *ln_tmp, *probs, *att_w, *conv_y;
    Active *scratch_act;           /* [t] */
    int *sorted;
    /* counts for the energy report */
    double ops[10];
    double spikes;
    long tokens_fed;
} Model;

enum { OP_AC, OP_ADD, OP_MUL, OP_CMP, OP_SHIFT, OP_MAC, OP_EXP, OP_DIV, OP_SQRT, OP_LIF };
static const char *OP_NAMES[] = {"ac", "add", "mul", "cmp", "shift", "mac", "exp", "div", "sqrt", "lif"};
/* fp32 45 nm prices in pJ (spikedecoder/energy/pricing.py: Horowitz; mul = MAC - AC; exp 8, div 4, sqrt 4 MACs) */
static const double PRICE[] = {0.9, 0.9, 3.7, 0.9, 0.9, 4.6, 8 * 4.6, 4 * 4.6, 4 * 4.6, 4.6};

static void *zalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) die("out of memory", NULL);
    return p;
}

static void read_lif(Reader *r, Model *m, Lif *l, int n, const char *what) {
    l->th = read_tensor(r, (size_t)n, what);
    l->decay = m->c[LEARNED_DECAY] ? read_tensor(r, (size_t)n, what) : NULL;
}

/* a Linear whose input is `width` tokens of `in` features (the token convolution): conv_mode "full" widens its
   input to them; "channel" has it read one token and convolve its outputs, the taps (width, out) after it */
static void read_lin(Reader *r, Model *m, Lin *l, int in, int width, int out, int layer_norm, const char *what) {
    int channel = m->c[CONV_MODE] == 1;
    l->in = channel ? in : width * in;
    l->out = out;
    l->rows = read_tensor(r, (size_t)l->in * out, what);
    l->bias = read_tensor(r, (size_t)out, what);
    l->lnw = layer_norm ? read_tensor(r, (size_t)out, what) : NULL;
    l->lnb = layer_norm ? read_tensor(r, (size_t)out, what) : NULL;
    l->conv = channel ? width : 1;
    l->taps = l->conv > 1 ? read_tensor(r, (size_t)width * out, what) : NULL;
}

static void check_config(Model *m, const char *path) {
    const int *c = m->c;
    char msg[300];
    int ok = (c[KIND] == SPIKING || c[KIND] == ANN) && c[VOCAB] >= 1 && c[VOCAB] <= 1 << 20 && c[MAX_LEN] >= 1 &&
             c[MAX_LEN] <= 1 << 16 && c[N_LAYER] >= 1 && c[N_LAYER] <= 1024 && c[N_HEAD] >= 1 && c[N_EMBD] >= 1 &&
             c[N_EMBD] <= 1 << 16 && c[N_EMBD] % c[N_HEAD] == 0 && c[HIDDEN] >= 1 && c[HIDDEN] <= 1 << 18 &&
             c[STEPS] >= 1 && c[STEPS] <= 64 && c[EMBED] >= 0 && c[EMBED] <= 2 && c[TOKEN_CONV] >= 1 &&
             c[TOKEN_CONV] <= 64 && c[KEY_WIDTH] >= c[TOKEN_CONV] && c[KEY_WIDTH] <= 64 && c[MLP_CONV] >= 1 &&
             c[MLP_CONV] <= 64 && (c[CONV_MODE] == 0 || c[CONV_MODE] == 1) && c[SPIKE_LEVELS] >= 1 &&
             c[SPIKE_LEVELS] <= 255 && c[QKV_LEVELS] >= 1 && c[QKV_LEVELS] <= 255 &&
             (c[ATTN_POWER] == 1 || c[ATTN_POWER] == 2) && c[AV_NORM] >= 0 && c[AV_NORM] <= 2 &&
             c[HEAD_COMBINE] >= 0 && c[HEAD_COMBINE] <= 3 && c[TOK_WIDTH] >= 1 &&
             c[TOK_WIDTH] <= c[N_EMBD] && (c[KIND] == SPIKING || c[STEPS] == 1) && m->tau > 1.0f &&
             m->scale > 0.0f && m->eps > 0.0f;
    if (!ok) {
        snprintf(msg, sizeof msg, "%s is corrupt: its header holds an impossible configuration; export it again", path);
        die(msg, NULL);
    }
}

static void load(Model *m, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open model file", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 0) die("cannot read model file", path);
    unsigned char *data = malloc((size_t)size + 1);
    if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) die("cannot read model file", path);
    fclose(f);
    Reader rd = {data, (size_t)size, 0, path}, *r = &rd;
    need(r, 4, "the magic number");
    if (memcmp(data, MAGIC, 4) != 0) die("not a SpikeDecoder runtime file (bad magic number); make one with "
                                         "`spikedecoder export RUN OUT.bin`", path);
    r->at = 4;
    uint32_t version = read_u32(r, "the version");
    if (version != VERSION) {
        char msg[200];
        snprintf(msg, sizeof msg, "%s has format version %u; this sd reads version %d (rebuild sd or export again)",
                 path, version, VERSION);
        die(msg, NULL);
    }
    if (read_u32(r, "the header") != N_INTS) die("header size differs from this sd's format", path);
    for (int i = 0; i < N_INTS; i++) m->c[i] = (int)read_u32(r, "the header");
    if (read_u32(r, "the header") != N_FLOATS) die("header size differs from this sd's format", path);
    m->tau = read_f32(r, "the header");
    m->scale = read_f32(r, "the header");
    m->eps = read_f32(r, "the header");
    check_config(m, path);
    int *c = m->c;
    m->E = c[N_EMBD], m->H = c[N_HEAD], m->dh = m->E / m->H, m->T = c[STEPS], m->L = c[N_LAYER];
    m->hidden = c[HIDDEN], m->V = c[VOCAB];
    m->window = zalloc(sizeof(int) * (size_t)m->H);
    m->wmax = 1;
    for (int h = 0; h < m->H; h++) {
        m->window[h] = (int)read_u32(r, "the head windows");
        if (m->window[h] < 0 || m->window[h] > 1 << 16) die("corrupt head window in", path);
        if (m->window[h] == 0) m->has_long = 1;
        if (m->window[h] > m->wmax) m->wmax = m->window[h];
    }
    m->vocab_n = (int)read_u32(r, "the vocabulary");
    if (m->vocab_n != m->V) die("the vocabulary size differs from the header's in", path);
    m->vocab = zalloc(sizeof *m->vocab * (size_t)m->V);
    for (int i = 0; i < m->V; i++) {
        need(r, 1, "the vocabulary");
        int len = r->data[r->at++];
        if (len < 1 || len > 4) die("corrupt vocabulary entry in", path);
        need(r, (size_t)len, "the vocabulary");
        memcpy(m->vocab[i], r->data + r->at, (size_t)len);
        r->at += (size_t)len;
    }
    int E = m->E, ann = c[KIND] == ANN, ln = c[NORM] == 1;
    if (c[EMBED] == 2) {  /* concatenated {0,1} codes */
        m->tok = read_tensor(r, (size_t)m->V * c[TOK_WIDTH], "the token code");
        m->pos = read_tensor(r, (size_t)c[MAX_LEN] * (E - c[TOK_WIDTH]), "the position code");
    } else {
        m->tok = read_tensor(r, (size_t)m->V * E, "the token table");
        m->pos = read_tensor(r, (size_t)c[MAX_LEN] * E, "the position table");
    }
    m->layers = zalloc(sizeof(Layer) * (size_t)m->L);
    for (int i = 0; i < m->L; i++) {
        Layer *l = &m->layers[i];
        if (ann) {
            l->ln1w = read_tensor(r, (size_t)E, "ln1"), l->ln1b = read_tensor(r, (size_t)E, "ln1");
            read_lin(r, m, &l->qkv, E, c[TOKEN_CONV], 3 * E, 0, "qkv");
            read_lin(r, m, &l->proj, E, 1, E, 0, "proj");
            l->ln2w = read_tensor(r, (size_t)E, "ln2"), l->ln2b = read_tensor(r, (size_t)E, "ln2");
            read_lin(r, m, &l->fc1, E, c[MLP_CONV], m->hidden, 0, "fc1");
            read_lin(r, m, &l->fc2, m->hidden, 1, E, 0, "fc2");
            continue;
        }
        l->has_in_lif = i > 0 || c[FIRST_IN_LIF];
        if (l->has_in_lif) read_lif(r, m, &l->in_lif, E, "attention input LIF");
        read_lin(r, m, &l->q, E, c[TOKEN_CONV], E, ln, "q");
        read_lin(r, m, &l->k, E, c[KEY_WIDTH], E, ln, "k");
        read_lin(r, m, &l->v, E, c[TOKEN_CONV], E, ln, "v");
        read_lif(r, m, &l->q_lif, E, "q LIF");
        read_lif(r, m, &l->k_lif, E, "k LIF");
        read_lif(r, m, &l->v_lif, E, "v LIF");
        if (c[AV_NORM]) l->av_a = read_tensor(r, (size_t)E, "av_norm"), l->av_b = read_tensor(r, (size_t)E, "av_norm");
        read_lif(r, m, &l->attn_lif, E, "attention LIF");
        read_lin(r, m, &l->proj, E, 1, E, ln, "proj");
        read_lif(r, m, &l->mlp_lif, E, "MLP input LIF");
        read_lin(r, m, &l->fc1, E, c[MLP_CONV], m->hidden, ln, "fc1");
        read_lif(r, m, &l->hid_lif, m->hidden, "MLP hidden LIF");
        read_lin(r, m, &l->fc2, m->hidden, 1, E, ln, "fc2");
    }
    if (ann) {
        m->head_lnw = read_tensor(r, (size_t)E, "head LayerNorm"), m->head_lnb = read_tensor(r, (size_t)E, "head");
        read_lin(r, m, &m->head, E, 1, m->V, 0, "head");
    } else {
        read_lif(r, m, &m->head_lif, E, "head LIF");
        read_lin(r, m, &m->head, c[HEAD_COMBINE] == 2 ? E * m->T : E, 1, m->V, 0, "head");
    }
    need(r, 4, "the end marker");
    if (memcmp(r->data + r->at, END_MAGIC, 4) != 0 || r->at + 4 != r->size)
        die("corrupt model file (no end marker where the weights end); export it again", path);
    free(data);
    /* the leak as a shift when tau is a power of two (spikedecoder/neurons.py leak_shift) */
    int e2;
    float mant = frexpf(m->tau, &e2);
    m->shift = mant == 0.5f ? ldexpf(1.0f, 1 - e2) : 0.0f;
}

/* ------------------------------------------------------------------------------------------------ state */
/* the rings of past outputs of the convolved Linears (conv_mode "channel"; [K-1 slots][T][out] each): allocated
   zeroed on the first call, zeroed on the next ones */
static void clear_conv_rings(Model *m) {
    for (int i = 0; i < m->L; i++) {
        Layer *y = &m->layers[i];
        Lin *convolved[5] = {&y->q, &y->k, &y->v, &y->qkv, &y->fc1};
        for (int j = 0; j < 5; j++) {
            Lin *l = convolved[j];
            size_t n = l->conv > 1 ? (size_t)(l->conv - 1) * m->T * l->out : 0;
            if (n && !l->past) l->past = zalloc(sizeof(float) * n);
            else if (n) memset(l->past, 0, sizeof(float) * n);
        }
    }
}

static void alloc_state(Model *m) {
    int E = m->E, T = m->T, L = m->L, n = m->hidden > 3 * E ? m->hidden : 3 * E;
    size_t tn = (size_t)T * n;
    /* the tokens whose inputs the Linears read: the last K under conv_mode "full", the current one under "channel"
       (whose convolutions keep their outputs instead, in each Linear's `past`) */
    int channel = m->c[CONV_MODE] == 1;
    m->sw = channel ? 1 : m->c[KEY_WIDTH] > m->c[TOKEN_CONV] ? m->c[KEY_WIDTH] : m->c[TOKEN_CONV];
    m->mw = channel ? 1 : m->c[MLP_CONV];
    clear_conv_rings(m);
    m->conv_y = zalloc(sizeof(float) * (size_t)n);
    m->x = zalloc(sizeof(float) * tn), m->pre = zalloc(sizeof(float) * tn);
    m->q = zalloc(sizeof(float) * tn), m->k = zalloc(sizeof(float) * tn), m->v = zalloc(sizeof(float) * tn);
    m->y = zalloc(sizeof(float) * tn), m->s = zalloc(sizeof(float) * tn), m->hbuf = zalloc(sizeof(float) * tn);
    m->vmem = zalloc(sizeof(float) * (size_t)n), m->ln_tmp = zalloc(sizeof(float) * (size_t)n);
    int headw = m->c[HEAD_COMBINE] == 2 ? E * T : E;
    m->logits = zalloc(sizeof(float) * (size_t)m->V * (T + 1));
    m->probs = zalloc(sizeof(float) * (size_t)m->V);
    m->sorted = zalloc(sizeof(int) * (size_t)m->V);
    m->att_w = zalloc(sizeof(float) * (size_t)m->c[MAX_LEN]);
    (void)headw;
    m->scratch_act = zalloc(sizeof(Active) * (size_t)T);
    for (int t = 0; t < T; t++) {
        m->scratch_act[t].idx = zalloc(sizeof(int) * (size_t)n);
        m->scratch_act[t].cnt = zalloc(sizeof(float) * (size_t)n);
    }
    if (m->c[KIND] == ANN) {
        m->attn_hist_dense = zalloc(sizeof(float) * (size_t)L * m->sw * E);
        m->mlp_hist_dense = zalloc(sizeof(float) * (size_t)L * m->mw * E);
        m->kbuf = zalloc(sizeof(float) * (size_t)L * m->c[MAX_LEN] * E);
        m->vbuf = zalloc(sizeof(float) * (size_t)L * m->c[MAX_LEN] * E);
        return;
    }
    size_t na = (size_t)L * m->sw * T, nm = (size_t)L * m->mw * T;
    m->attn_hist = zalloc(sizeof(Active) * na), m->mlp_hist = zalloc(sizeof(Active) * nm);
    for (size_t i = 0; i < na; i++)
        m->attn_hist[i].idx = zalloc(sizeof(int) * E), m->attn_hist[i].cnt = zalloc(sizeof(float) * E);
    for (size_t i = 0; i < nm; i++)
        m->mlp_hist[i].idx = zalloc(sizeof(int) * E), m->mlp_hist[i].cnt = zalloc(sizeof(float) * E);
    m->kbuf = zalloc(sizeof(float) * (size_t)L * m->wmax * T * E);
    m->vbuf = zalloc(sizeof(float) * (size_t)L * m->wmax * T * E);
    m->feat = m->c[ATTN_POWER] == 2 ? m->dh * m->dh : m->dh;
    if (m->has_long) {
        m->kv = zalloc(sizeof(float) * (size_t)L * T * m->H * m->feat * m->dh);
        m->z = zalloc(sizeof(float) * (size_t)L * T * m->H * m->feat);
    }
}

/* a fresh context: what a new cache is in PyTorch (generate.py restarts the window this way when it slides) */
static void reset(Model *m) {
    int E = m->E, T = m->T, L = m->L;
    m->pos_now = 0;
    clear_conv_rings(m);
    if (m->c[KIND] == ANN) {
        memset(m->attn_hist_dense, 0, sizeof(float) * (size_t)L * m->sw * E);
        memset(m->mlp_hist_dense, 0, sizeof(float) * (size_t)L * m->mw * E);
        return;  /* the KV cache is read only up to the current position */
    }
    for (size_t i = 0; i < (size_t)L * m->sw * T; i++) m->attn_hist[i].n = 0;
    for (size_t i = 0; i < (size_t)L * m->mw * T; i++) m->mlp_hist[i].n = 0;
    if (m->has_long) {
        memset(m->kv, 0, sizeof(float) * (size_t)L * T * m->H * m->feat * m->dh);
        memset(m->z, 0, sizeof(float) * (size_t)L * T * m->H * m->feat);
    }
}

/* ------------------------------------------------------------------------------------------------ kernels */
/* acc += a * row: the inner loop of every Linear, spiking or not (eight at a time so that the compiler vectorises it
   at -O2); a spike's row is added with a = 1, exact */
static void axpy_row(float *restrict acc, const float *restrict row, float a, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        acc[i] += a * row[i], acc[i + 1] += a * row[i + 1], acc[i + 2] += a * row[i + 2];
        acc[i + 3] += a * row[i + 3], acc[i + 4] += a * row[i + 4], acc[i + 5] += a * row[i + 5];
        acc[i + 6] += a * row[i + 6], acc[i + 7] += a * row[i + 7];
    }
    for (; i < n; i++) acc[i] += a * row[i];
}

/* acc += a0 r0 + a1 r1 + a2 r2 + a3 r3, added row after row per element (the floats of four axpy_row calls, bit for
   bit), with acc loaded and stored once instead of four times: four row streams in flight at once */
static void axpy4(float *restrict acc, const float *restrict r0, const float *restrict r1, const float *restrict r2,
                  const float *restrict r3, const float *a, int n) {
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    for (int i = 0; i < n; i++) {
        float v = acc[i];
        v += a0 * r0[i];
        v += a1 * r1[i];
        v += a2 * r2[i];
        v += a3 * r3[i];
        acc[i] = v;
    }
}

/* acc += sum_k a[k] rows[k] over nr rows, four at a time (axpy4), the rest one by one: the same floats as nr
   axpy_row calls in order (a multiply by 1 is exact, so a spike's row is added unchanged) */
static void axpy_rows(float *acc, const float *const *rows, const float *a, int nr, int n) {
    int k = 0;
    for (; k + 4 <= nr; k += 4) axpy4(acc, rows[k], rows[k + 1], rows[k + 2], rows[k + 3], a + k, n);
    for (; k < nr; k++) axpy_row(acc, rows[k], a[k], n);
}

/* acc += sum_i x_i rows[i] over `in` consecutive rows of width n: the ANN's GEMV, four rows at a time as the event
   Linear takes its active rows */
static void gemv(float *acc, const float *rows, const float *x, int in, int n) {
    int i = 0;
    for (; i + 4 <= in; i += 4) {
        const float *r = rows + (size_t)i * n;
        axpy4(acc, r, r + n, r + 2 * (size_t)n, r + 3 * (size_t)n, x + i, n);
    }
    for (; i < in; i++) axpy_row(acc, rows + (size_t)i * n, x[i], n);
}

/* event Linear: out = bias + sum over the inputs' tokens j (the token convolution: input block j reads the token
   j back) of the rows of the active inputs, a count c adding c times the row (one multiply by a small integer per
   element; the energy counter charges it as c accumulates, |c| for a negative count) */
static void event_linear(Model *m, const Lin *l, Active *const *ins, int n_ins, int width, float *out) {
    int E = l->in / width;
    memcpy(out, l->bias, sizeof(float) * (size_t)l->out);
    double acs = 0;
    for (int j = 0; j < n_ins && j < width; j++) {
        const Active *a = ins[j];
        if (!a) continue;
        for (int i0 = 0; i0 < a->n; i0 += 4) {  /* the active rows four at a time, in order */
            const float *rows[4];
            float cs[4];
            int nr = a->n - i0 < 4 ? a->n - i0 : 4;
            for (int k = 0; k < nr; k++) {
                rows[k] = l->rows + (size_t)(j * E + a->idx[i0 + k]) * l->out;
                cs[k] = a->cnt[i0 + k];
                acs += fabsf(cs[k]);
            }
            axpy_rows(out, rows, cs, nr, l->out);
        }
    }
    m->ops[OP_AC] += acs * l->out;
    m->ops[OP_ADD] += l->out;  /* the bias */
}

/* dense Linear (the ANN): out = bias + sum_i x_i row_i over every input, a GEMV with the same inner loop */
static void dense_linear(Model *m, const Lin *l, const float *x, float *out) {
    memcpy(out, l->bias, sizeof(float) * (size_t)l->out);
    gemv(out, l->rows, x, l->in, l->out);
    m->ops[OP_MAC] += (double)l->in * l->out;
    m->ops[OP_ADD] += l->out;
}

/* LayerNorm over n channels (torch.nn.LayerNorm: biased variance, eps inside the root), in place */
static void layer_norm(Model *m, float *x, const float *w, const float *b, int n) {
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
    var /= n;
    float inv = (float)(1.0 / sqrt(var + m->eps)), mu = (float)mean;
    for (int i = 0; i < n; i++) x[i] = (x[i] - mu) * inv * w[i] + b[i];
    /* spikedecoder/energy/counter.py _layer_norm */
    m->ops[OP_ADD] += 2.0 * n, m->ops[OP_MAC] += 2.0 * n, m->ops[OP_MUL] += n + 2.0;
    m->ops[OP_SQRT] += 1, m->ops[OP_DIV] += 1;
}

/* conv_mode "channel": the Linear's outputs z (step t of the current token, in place) mixed channel by channel with
   its outputs for the last K-1 tokens at the same step, y = z_i taps[0] + z_{i-1} taps[1] + ... in that order
   (spikedecoder/layers.py ChannelConv: bit for bit), zeros before the first token; then z is kept in the ring of
   K-1 slots (token i in slot i mod K-1). Energy as the counter prices `z * taps[j]` and `y + ...`: K multiplies and
   K-1 adds per channel. */
static void channel_conv(Model *m, const Lin *l, float *z, int t) {
    int K = l->conv, n = l->out, p = m->pos_now, T = m->T;
    if (K <= 1) return;
    float *y = m->conv_y;
    for (int i = 0; i < n; i++) y[i] = z[i] * l->taps[i];
    for (int j = 1; j < K; j++) {
        int slot = (p - j + K - 1) % (K - 1);  /* token p - j's (not yet written, so zeros, before the first) */
        const float *zj = l->past + ((size_t)slot * T + t) * n, *tap = l->taps + (size_t)j * n;
        for (int i = 0; i < n; i++) y[i] = y[i] + zj[i] * tap[i];
    }
    memcpy(l->past + ((size_t)(p % (K - 1)) * T + t) * n, z, sizeof(float) * (size_t)n);
    memcpy(z, y, sizeof(float) * (size_t)n);
    m->ops[OP_MUL] += (double)K * n, m->ops[OP_ADD] += (double)(K - 1) * n;
}

/* LIF over the T steps of one token, per channel: x (T, n) currents -> s (T, n) spike counts, and the active lists
   of each step. The charge is spikedecoder/neurons.py `charge` / `learned_charge` in the same order, the fire rule
   `fire` (a count of the thresholds k th crossed, k = 1..levels; bipolar: minus those -h crosses), hard reset. */
static void lif(Model *m, const Lif *l, const float *x, float *s, Active *act, int n, int levels, int bipolar) {
    int T = m->T, di = m->c[DECAY_INPUT];
    float tau = m->tau, sh = m->shift;
    if (act)
        for (int t = 0; t < T; t++) act[t].n = 0;
    double fired = 0;
    for (int i = 0; i < n; i++) {
        float v = 0.0f, th = l->th[i];
        for (int t = 0; t < T; t++) {
            float xt = x[(size_t)t * n + i], h;
            if (l->decay) {
                float d = l->decay[i];
                h = di ? v + (xt - v) * d : v - v * d + xt;
            } else if (sh == 0.0f) {
                h = di ? v + (xt - v) / tau : v - v / tau + xt;
            } else if (di) {
                h = tau == 2.0f ? (v + xt) * 0.5f : (v - v * sh) + xt * sh;
            } else {
                h = (v - v * sh) + xt;
            }
            int c = h - th >= 0.0f;
            for (int k = 2; k <= levels; k++) c += h - th * (float)k >= 0.0f;
            for (int k = 1; bipolar && k <= levels; k++) c -= -h - th * (float)k >= 0.0f;
            s[(size_t)t * n + i] = (float)c;
            v = c != 0 ? 0.0f : h;
            if (c != 0) {
                fired += abs(c);
                if (act) {
                    Active *a = &act[t];
                    a->idx[a->n] = i, a->cnt[a->n] = (float)c, a->n++;
                }
            }
        }
    }
    /* spikedecoder/neurons.py charge_ops, plus one comparison per level (and sign) */
    double updates = (double)n * T;
    if (l->decay) m->ops[OP_LIF] += updates, m->ops[OP_ADD] += di ? updates : 0;
    else if (sh == 0.0f) m->ops[OP_LIF] += updates, m->ops[OP_ADD] += di ? updates : 0;
    else if (di && tau == 2.0f) m->ops[OP_ADD] += updates, m->ops[OP_SHIFT] += updates;
    else if (di) m->ops[OP_ADD] += 2 * updates, m->ops[OP_SHIFT] += 2 * updates;
    else m->ops[OP_ADD] += 2 * updates, m->ops[OP_SHIFT] += updates;
    m->ops[OP_CMP] += updates * levels * (bipolar ? 2 : 1);
    m->spikes += fired;
}

static void copy_active(Active *dst, const Active *src) {
    dst->n = src->n;
    memcpy(dst->idx, src->idx, sizeof(int) * (size_t)src->n);
    memcpy(dst->cnt, src->cnt, sizeof(float) * (size_t)src->n);
}

/* ------------------------------------------------------------------------------------------------ spiking model */
/* y (T, E) = each head's A V for the current token (before the scale): window heads over their last W keys, whole-
   context heads from their state (read the rows of the active query features, then add the value into the rows of
   the active key features). Every sum is of small integers: exact, so equal to PyTorch's. */
static void spiking_attention(Model *m, int layer) {
    int E = m->E, T = m->T, H = m->H, dh = m->dh, p = m->pos_now, W = m->wmax, F = m->feat;
    int power = m->c[ATTN_POWER], norm = m->c[COINCIDENCE_NORM];
    float *kb = m->kbuf + (size_t)layer * W * T * E, *vb = m->vbuf + (size_t)layer * W * T * E;
    memcpy(kb + (size_t)(p % W) * T * E, m->k, sizeof(float) * (size_t)T * E);
    memcpy(vb + (size_t)(p % W) * T * E, m->v, sizeof(float) * (size_t)T * E);
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            const float *q = m->q + (size_t)t * E + h * dh;
            float *y = m->y + (size_t)t * E + h * dh, den = 0.0f;
            for (int c = 0; c < dh; c++) y[c] = 0.0f;
            if (m->window[h] > 0) {
                for (int j = 0; j < m->window[h] && j <= p; j++) {
                    int slot = (p - j) % W;
                    const float *k = kb + ((size_t)slot * T + t) * E + h * dh;
                    const float *v = vb + ((size_t)slot * T + t) * E + h * dh;
                    float score = 0.0f;
                    for (int c = 0; c < dh; c++)
                        if (q[c] != 0.0f && k[c] != 0.0f) score += q[c] * k[c], m->ops[OP_AC] += fabsf(q[c] * k[c]);
                    if (power == 2) score *= score, m->ops[OP_MUL] += score != 0.0f;
                    if (score == 0.0f) continue;
                    for (int c = 0; c < dh; c++)
                        if (v[c] != 0.0f) y[c] += score * v[c], m->ops[OP_AC] += fabsf(score * v[c]);
                    den += score, m->ops[OP_ADD] += 1;
                }
            } else {
                float *kv = m->kv + (((size_t)layer * T + t) * H + h) * F * dh;
                float *z = m->z + (((size_t)layer * T + t) * H + h) * F;
                const float *k = m->k + (size_t)t * E + h * dh, *v = m->v + (size_t)t * E + h * dh;
                float self = 0.0f;  /* the new token's own score (q.k)^power */
                for (int c = 0; c < dh; c++) self += q[c] * k[c];
                if (power == 2) self *= self;
                for (int c = 0; c < dh; c++) y[c] = self * v[c];
                den = self;
                for (int a = 0; a < dh; a++) {  /* read: the rows of the active query features */
                    if (q[a] == 0.0f) continue;
                    for (int b = 0; b < (power == 2 ? dh : 1); b++) {
                        float qf = power == 2 ? q[a] * q[b] : q[a];
                        if (qf == 0.0f) continue;
                        int f = power == 2 ? a * dh + b : a;
                        axpy_row(y, kv + (size_t)f * dh, qf, dh);
                        den += qf * z[f];
                        m->ops[OP_AC] += fabsf(qf) * (dh + 1);
                    }
                }
                for (int a = 0; a < dh; a++) {  /* write: the value into the rows of the active key features */
                    if (k[a] == 0.0f) continue;
                    for (int b = 0; b < (power == 2 ? dh : 1); b++) {
                        float kf = power == 2 ? k[a] * k[b] : k[a];
                        if (kf == 0.0f) continue;
                        int f = power == 2 ? a * dh + b : a;
                        axpy_row(kv + (size_t)f * dh, v, kf, dh);
                        z[f] += kf;
                        m->ops[OP_AC] += fabsf(kf) * (dh + 1);
                    }
                }
            }
            if (norm) {
                float d = den < 1.0f ? 1.0f : den;
                for (int c = 0; c < dh; c++) y[c] = y[c] / d;
                m->ops[OP_DIV] += dh;
            }
        }
    }
}

/* one token through the spiking model; the head's logits only when asked (the last token of a prefill) */
static void spiking_forward(Model *m, int token, int want_logits) {
    int E = m->E, T = m->T, p = m->pos_now, *c = m->c;
    float *x = m->x;
    Active *in = m->scratch_act;
    /* the embedding: {0,1} spikes, the same at every step (direct encoding); they are the residual stream too */
    for (int t = 0; t < T; t++) in[t].n = 0;
    for (int i = 0; i < E; i++) {
        float bit;
        if (c[EMBED] == 1) bit = m->tok[(size_t)token * E + i] + m->pos[(size_t)p * E + i] >= 0.0f;
        else if (i < c[TOK_WIDTH]) bit = m->tok[(size_t)token * c[TOK_WIDTH] + i];
        else bit = m->pos[(size_t)p * (E - c[TOK_WIDTH]) + i - c[TOK_WIDTH]];
        for (int t = 0; t < T; t++) {
            x[(size_t)t * E + i] = bit;
            if (bit != 0.0f) in[t].idx[in[t].n] = i, in[t].cnt[in[t].n] = bit, in[t].n++;
        }
    }
    m->ops[OP_ADD] += c[EMBED] == 1 ? E : 0;
    Active *ins[64];
    for (int layer = 0; layer < m->L; layer++) {
        Layer *l = &m->layers[layer];
        Active *hist = m->attn_hist + (size_t)layer * m->sw * T;
        /* attention input spikes, kept for the token convolutions of the next tokens */
        if (l->has_in_lif) lif(m, &l->in_lif, x, m->s, in, E, c[SPIKE_LEVELS], c[BIPOLAR]);
        for (int t = 0; t < T; t++) copy_active(&hist[(size_t)(p % m->sw) * T + t], &in[t]);
        /* Q, K, V: LIF(Norm(Linear([x_i, x_{i-1}, ...]))); under conv_mode "channel" LIF(Conv(Norm(Linear(x_i)))) */
        const Lin *proj[3] = {&l->q, &l->k, &l->v};
        const Lif *lifs[3] = {&l->q_lif, &l->k_lif, &l->v_lif};
        float *outs[3] = {m->q, m->k, m->v};
        for (int w = 0; w < 3; w++) {
            int width = proj[w]->in / E;  /* the tokens its input holds */
            for (int t = 0; t < T; t++) {
                int n = 0;
                for (int j = 0; j < width; j++, n++) ins[j] = j <= p ? &hist[(size_t)((p - j) % m->sw) * T + t] : NULL;
                float *out = m->pre + (size_t)t * E;
                if (t > 0 && layer == 0 && !l->has_in_lif) {  /* the embedding is the same at every step: once */
                    memcpy(out, m->pre, sizeof(float) * (size_t)E);
                    continue;
                }
                event_linear(m, proj[w], ins, n, width, out);
                if (proj[w]->lnw) layer_norm(m, out, proj[w]->lnw, proj[w]->lnb, E);
                channel_conv(m, proj[w], out, t);
            }
            lif(m, lifs[w], m->pre, outs[w], NULL, E, c[QKV_LEVELS], 0);
        }
        spiking_attention(m, layer);
        for (size_t i = 0; i < (size_t)T * E; i++) m->y[i] *= m->scale;
        m->ops[OP_MUL] += (double)T * E;
        if (c[AV_NORM] == 1) {
            for (int t = 0; t < T; t++)
                for (int i = 0; i < E; i++) m->y[(size_t)t * E + i] = m->y[(size_t)t * E + i] * l->av_a[i] + l->av_b[i];
            m->ops[OP_MAC] += (double)T * E;
        } else if (c[AV_NORM] == 2) {
            for (int t = 0; t < T; t++) layer_norm(m, m->y + (size_t)t * E, l->av_a, l->av_b, E);
        }
        lif(m, &l->attn_lif, m->y, m->s, in, E, c[SPIKE_LEVELS], c[BIPOLAR]);
        for (int t = 0; t < T; t++) {
            ins[0] = &in[t];
            event_linear(m, &l->proj, ins, 1, 1, m->pre);
            if (l->proj.lnw) layer_norm(m, m->pre, l->proj.lnw, l->proj.lnb, E);
            for (int i = 0; i < E; i++) x[(size_t)t * E + i] += m->pre[i];
        }
        m->ops[OP_ADD] += (double)T * E;  /* the residual sum */
        /* MLP: LIF -> Linear([x_i, x_{i-1}, ...]) -> Norm (-> Conv under "channel") -> LIF -> Linear -> Norm */
        Active *mh = m->mlp_hist + (size_t)layer * m->mw * T;
        lif(m, &l->mlp_lif, x, m->s, in, E, c[SPIKE_LEVELS], c[BIPOLAR]);
        for (int t = 0; t < T; t++) copy_active(&mh[(size_t)(p % m->mw) * T + t], &in[t]);
        float *hid = m->hbuf;
        for (int t = 0; t < T; t++) {
            for (int j = 0; j < m->mw; j++) ins[j] = j <= p ? &mh[(size_t)((p - j) % m->mw) * T + t] : NULL;
            event_linear(m, &l->fc1, ins, m->mw, m->mw, hid + (size_t)t * m->hidden);
            if (l->fc1.lnw) layer_norm(m, hid + (size_t)t * m->hidden, l->fc1.lnw, l->fc1.lnb, m->hidden);
            channel_conv(m, &l->fc1, hid + (size_t)t * m->hidden, t);
        }
        lif(m, &l->hid_lif, hid, m->s, in, m->hidden, c[SPIKE_LEVELS], c[BIPOLAR]);
        for (int t = 0; t < T; t++) {
            ins[0] = &in[t];
            event_linear(m, &l->fc2, ins, 1, 1, m->pre);
            if (l->fc2.lnw) layer_norm(m, m->pre, l->fc2.lnw, l->fc2.lnb, E);
            for (int i = 0; i < E; i++) x[(size_t)t * E + i] += m->pre[i];
        }
        m->ops[OP_ADD] += (double)T * E;
        /* restore the embedding's active lists for nothing: `in` is rebuilt by the next layer's input LIF */
    }
    if (!want_logits) return;
    /* head: LIF, then the Linear on its spikes (per step, or on the concatenated steps), the steps combined */
    lif(m, &m->head_lif, x, m->s, in, E, c[SPIKE_LEVELS], c[BIPOLAR]);
    int V = m->V, combine = c[HEAD_COMBINE];
    if (combine == 2) {
        for (int t = 0; t < T; t++) ins[t] = &in[t];
        event_linear(m, &m->head, ins, T, T, m->logits);
        return;
    }
    if (combine == 3) {
        ins[0] = &in[T - 1];
        event_linear(m, &m->head, ins, 1, 1, m->logits);
        return;
    }
    float *step = m->logits + V;
    for (int t = 0; t < T; t++) {
        ins[0] = &in[t];
        event_linear(m, &m->head, ins, 1, 1, t == 0 ? m->logits : step);
        if (t > 0)
            for (int i = 0; i < V; i++) m->logits[i] += step[i];
    }
    m->ops[OP_ADD] += (double)(T - 1) * V;
    if (combine == 0 && T > 1) {
        for (int i = 0; i < V; i++) m->logits[i] /= (float)T;
        m->ops[OP_DIV] += V;
    }
}

/* ------------------------------------------------------------------------------------------------ ANN twin */
static float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

static void ann_forward(Model *m, int token, int want_logits) {
    int E = m->E, H = m->H, dh = m->dh, p = m->pos_now, *c = m->c, ML = c[MAX_LEN];
    float *x = m->x, *h = m->y, *qkv = m->q, *att = m->k, *hid = m->hbuf, *w = m->att_w;
    for (int i = 0; i < E; i++) x[i] = m->tok[(size_t)token * E + i] + m->pos[(size_t)p * E + i];
    m->ops[OP_ADD] += E;
    float scale = 1.0f / sqrtf((float)dh);
    for (int layer = 0; layer < m->L; layer++) {
        Layer *l = &m->layers[layer];
        /* attention: LayerNorm, the token convolution's inputs, QKV (its convolution under "channel"), softmax over the
           cached keys, proj */
        float *hist = m->attn_hist_dense + (size_t)layer * m->sw * E;
        memcpy(h, x, sizeof(float) * (size_t)E);
        layer_norm(m, h, l->ln1w, l->ln1b, E);
        memcpy(hist + (size_t)(p % m->sw) * E, h, sizeof(float) * (size_t)E);
        memcpy(qkv, l->qkv.bias, sizeof(float) * 3 * (size_t)E);
        for (int j = 0; j < l->qkv.in / E && j <= p; j++) {
            const float *xj = hist + (size_t)((p - j) % m->sw) * E;
            gemv(qkv, l->qkv.rows + (size_t)j * E * 3 * E, xj, E, 3 * E);
        }
        m->ops[OP_MAC] += (double)l->qkv.in * l->qkv.out, m->ops[OP_ADD] += l->qkv.out;
        channel_conv(m, &l->qkv, qkv, 0);
        float *kc = m->kbuf + (size_t)layer * ML * E, *vc = m->vbuf + (size_t)layer * ML * E;
        memcpy(kc + (size_t)p * E, qkv + E, sizeof(float) * (size_t)E);
        memcpy(vc + (size_t)p * E, qkv + 2 * E, sizeof(float) * (size_t)E);
        for (int hd = 0; hd < H; hd++) {
            const float *q = qkv + hd * dh;
            int first = m->window[hd] > 0 && p - m->window[hd] + 1 > 0 ? p - m->window[hd] + 1 : 0;
            float mx = -INFINITY, sum = 0.0f;
            for (int j = first; j <= p; j++) {
                const float *k = kc + (size_t)j * E + hd * dh;
                float d = 0.0f;
                for (int i = 0; i < dh; i++) d += q[i] * k[i];
                w[j] = d * scale;
                if (w[j] > mx) mx = w[j];
            }
            for (int j = first; j <= p; j++) w[j] = expf(w[j] - mx), sum += w[j];
            float *y = att + hd * dh;
            for (int i = 0; i < dh; i++) y[i] = 0.0f;
            for (int j = first; j <= p; j++) axpy_row(y, vc + (size_t)j * E + hd * dh, w[j] / sum, dh);
            /* spikedecoder/energy/counts.py attention_counts */
            double pairs = p - first + 1;
            m->ops[OP_MUL] += dh + pairs, m->ops[OP_MAC] += 2 * pairs * dh, m->ops[OP_CMP] += pairs;
            m->ops[OP_ADD] += 2 * pairs, m->ops[OP_EXP] += pairs, m->ops[OP_DIV] += 1;
        }
        dense_linear(m, &l->proj, att, h);
        for (int i = 0; i < E; i++) x[i] += h[i];
        m->ops[OP_ADD] += E;
        /* MLP: LayerNorm, the token convolution's inputs, fc1 (its convolution under "channel"), GELU, fc2 */
        float *mh = m->mlp_hist_dense + (size_t)layer * m->mw * E;
        memcpy(h, x, sizeof(float) * (size_t)E);
        layer_norm(m, h, l->ln2w, l->ln2b, E);
        memcpy(mh + (size_t)(p % m->mw) * E, h, sizeof(float) * (size_t)E);
        memcpy(hid, l->fc1.bias, sizeof(float) * (size_t)m->hidden);
        for (int j = 0; j < m->mw && j <= p; j++) {
            const float *xj = mh + (size_t)((p - j) % m->mw) * E;
            gemv(hid, l->fc1.rows + (size_t)j * E * m->hidden, xj, E, m->hidden);
        }
        m->ops[OP_MAC] += (double)l->fc1.in * l->fc1.out, m->ops[OP_ADD] += l->fc1.out;
        channel_conv(m, &l->fc1, hid, 0);
        for (int i = 0; i < m->hidden; i++) hid[i] = gelu(hid[i]);
        m->ops[OP_EXP] += m->hidden, m->ops[OP_MUL] += 3.0 * m->hidden, m->ops[OP_ADD] += m->hidden;
        dense_linear(m, &l->fc2, hid, h);
        for (int i = 0; i < E; i++) x[i] += h[i];
        m->ops[OP_ADD] += E;
    }
    if (!want_logits) return;
    memcpy(h, x, sizeof(float) * (size_t)E);
    layer_norm(m, h, m->head_lnw, m->head_lnb, E);
    dense_linear(m, &m->head, h, m->logits);
}

static void forward(Model *m, int token, int want_logits) {
    if (m->c[KIND] == ANN) ann_forward(m, token, want_logits);
    else spiking_forward(m, token, want_logits);
    m->pos_now++;
    m->tokens_fed++;
}

/* ------------------------------------------------------------------------------------------------ sampling */
static uint64_t rng_state;
static uint32_t rng_u32(void) {  /* xorshift64* */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float rng_f32(void) { return (float)(rng_u32() >> 8) / 16777216.0f; }

static const float *sort_logits;
static int by_logit(const void *a, const void *b) {  /* descending, ties to the lower id (a stable sort) */
    int i = *(const int *)a, j = *(const int *)b;
    if (sort_logits[i] != sort_logits[j]) return sort_logits[i] > sort_logits[j] ? -1 : 1;
    return i - j;
}

/* the argmax (temperature 0), else a draw from softmax(logits / temperature) restricted to the top_k most likely
   tokens and then to the smallest most likely set reaching top_p (spikedecoder/generate.py sample_next) */
static int sample(Model *m, float temperature, int top_k, float top_p) {
    int V = m->V;
    const float *lg = m->logits;
    if (temperature == 0.0f) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (lg[i] > lg[best]) best = i;
        return best;
    }
    float *p = m->probs;
    int *order = m->sorted;
    for (int i = 0; i < V; i++) p[i] = lg[i] / temperature, order[i] = i;
    sort_logits = p;
    qsort(order, (size_t)V, sizeof(int), by_logit);
    int keep = top_k > 0 && top_k < V ? top_k : V;
    double sum = 0;
    for (int r = 0; r < keep; r++) sum += exp((double)p[order[r]] - p[order[0]]);
    double cum = 0;
    int n = 0;
    for (; n < keep; n++) {
        double pr = exp((double)p[order[n]] - p[order[0]]) / sum;
        if (top_p < 1.0f && n > 0 && cum >= top_p) break;
        cum += pr;
    }
    double u = rng_f32() * cum, acc = 0;
    for (int r = 0; r < n; r++) {
        acc += exp((double)p[order[r]] - p[order[0]]) / sum;
        if (u < acc) return order[r];
    }
    return order[n - 1];
}

/* ------------------------------------------------------------------------------------------------ text */
static int utf8_len(unsigned char b) { return b < 0x80 ? 1 : b >> 5 == 6 ? 2 : b >> 4 == 14 ? 3 : b >> 3 == 30 ? 4 : 1; }

static int encode(Model *m, const char *text, int *ids) {
    int n = 0;
    for (const char *s = text; *s;) {
        int len = utf8_len((unsigned char)*s), found = -1;
        for (int i = 0; i < m->V && found < 0; i++)
            if ((int)strlen(m->vocab[i]) == len && memcmp(m->vocab[i], s, (size_t)len) == 0) found = i;
        if (found < 0) {
            char ch[5] = {0};
            memcpy(ch, s, (size_t)len);
            fprintf(stderr, "error: the prompt holds %s (byte %ld), which is not in the model's vocabulary\n", ch,
                    (long)(s - text));
            exit(1);
        }
        ids[n++] = found;
        s += len;
    }
    return n;
}

static void unescape(char *s) {
    char *o = s;
    for (; *s; s++) {
        if (*s == '\\' && s[1]) {
            s++;
            *o++ = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
        } else {
            *o++ = *s;
        }
    }
    *o = 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* peak resident memory in KiB: this program's own high-water mark (VmHWM; getrusage's ru_maxrss on Linux also
   counts the process that exec'ed sd, e.g. a Python parent), getrusage where /proc is not there */
static long peak_rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) kib = strtol(line + 6, NULL, 10);
    if (f) fclose(f);
    if (kib < 0) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        kib = ru.ru_maxrss;
    }
    return kib;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr,
            "usage: sd MODEL.bin [-p PROMPT] [-n TOKENS] [-t TEMPERATURE] [-k TOP_K] [-P TOP_P] [-s SEED] [-e]\n"
            "                    [-l LOGITS_FILE] [-q]\n"
            "  -p  text to continue (default: a newline); -e decodes \\n and \\t in it\n"
            "  -n  new tokens (default 200)          -t  temperature, 0 = greedy (default 1.0)\n"
            "  -k  sample among the K most likely    -P  ... and among the most likely reaching P (0 < P <= 1)\n"
            "  -s  seed (default: the time)          -l  write each step's logits (float32, V per step) to a file\n"
            "  -q  do not print the text (only the statistics line on stderr)\n");
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') usage();
    const char *path = argv[1], *logits_path = NULL;
    char *prompt = "\n";
    int n_new = 200, top_k = 0, escapes = 0, quiet = 0;
    float temperature = 1.0f, top_p = 1.0f;
    uint64_t seed = (uint64_t)time(NULL);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-e") == 0) { escapes = 1; continue; }
        if (strcmp(a, "-q") == 0) { quiet = 1; continue; }
        if (a[0] != '-' || strlen(a) != 2 || i + 1 >= argc) usage();
        char *v = argv[++i], *end;
        switch (a[1]) {
        case 'p': prompt = v; break;
        case 'n': n_new = (int)strtol(v, &end, 10); if (*end || n_new < 0) usage(); break;
        case 't': temperature = strtof(v, &end); if (*end || !(temperature >= 0.0f)) usage(); break;
        case 'k': top_k = (int)strtol(v, &end, 10); if (*end || top_k < 1) usage(); break;
        case 'P': top_p = strtof(v, &end); if (*end || !(top_p > 0.0f && top_p <= 1.0f)) usage(); break;
        case 's': seed = strtoull(v, &end, 10); if (*end) usage(); break;
        case 'l': logits_path = v; break;
        default: usage();
        }
    }
    if (temperature > 0.0f && temperature < 1e-3f) die("temperature below 1e-3 overflows the logits; use 0", NULL);
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
    static Model model;
    Model *m = &model;
    load(m, path);
    alloc_state(m);
    if (escapes) unescape(prompt);
    if (!*prompt) die("empty prompt: the model needs at least one token to continue", NULL);
    int *seq = zalloc(sizeof(int) * (strlen(prompt) + (size_t)n_new + 1));
    int n = encode(m, prompt, seq);
    FILE *logf = logits_path ? fopen(logits_path, "wb") : NULL;
    if (logits_path && !logf) die("cannot write", logits_path);
    if (!quiet) fputs(prompt, stdout);
    /* the sliding window of spikedecoder/generate.py: the model sees seq[start:]; past max_len it restarts from
       the last max_len / 2 tokens at positions 0.. (one prefill) */
    int max_len = m->c[MAX_LEN], keep = max_len / 2 > 1 ? max_len / 2 : 1, start = 0, fed = 0;
    double *step_s = zalloc(sizeof(double) * ((size_t)n_new + 1));
    reset(m);
    double t0 = now();
    for (int g = 0; g < n_new; g++) {
        double ts = now();
        if (n - start > max_len) start = n - keep, fed = start, reset(m);
        for (; fed < n; fed++) forward(m, seq[fed], fed == n - 1);
        if (logf) fwrite(m->logits, sizeof(float), (size_t)m->V, logf);
        int token = sample(m, temperature, top_k, top_p);
        seq[n++] = token;
        step_s[g] = now() - ts;
        if (!quiet) fputs(m->vocab[token], stdout), fflush(stdout);
    }
    double elapsed = now() - t0;
    if (!quiet) fputc('\n', stdout);
    if (logf) fclose(logf);
    long peak_kib = peak_rss_kib();
    /* the median step: a decoding step of one token (steps that re-prefill after a slide are the few slow ones) */
    double median = 0;
    if (n_new > 1) {
        qsort(step_s + 1, (size_t)n_new - 1, sizeof(double), cmp_double);
        median = step_s[1 + (n_new - 1) / 2];
    }
    double pj = 0, per = m->tokens_fed ? 1.0 / m->tokens_fed : 0;
    for (int i = 0; i < 10; i++) pj += m->ops[i] * PRICE[i];
    fprintf(stderr, "%s: %d tokens in %.3f s, %.1f tokens/s (median step %.3f ms), %ld tokens fed, peak RSS %ld KiB,"
            " %.1f spikes/token, %.1f pJ/token (fp32 45 nm)\n", m->c[KIND] == ANN ? "ann" : "spiking", n_new, elapsed,
            n_new / (elapsed > 0 ? elapsed : 1e-9), median * 1e3, m->tokens_fed, peak_kib, m->spikes * per,
            pj * per);
    fprintf(stderr, "stats:{\"engine\":\"%s\",\"tokens\":%d,\"seconds\":%.6f,\"tokens_per_s\":%.3f,\"median_ms\":%.5f,"
            "\"tokens_fed\":%ld,\"peak_rss_kib\":%ld,\"spikes_per_token\":%.3f,\"pj_per_token\":%.3f,\"ops_per_token\":{",
            m->c[KIND] == ANN ? "c-ann" : "c-events", n_new, elapsed, n_new / (elapsed > 0 ? elapsed : 1e-9),
            median * 1e3, m->tokens_fed, peak_kib, m->spikes * per, pj * per);
    for (int i = 0; i < 10; i++) fprintf(stderr, "%s\"%s\":%.3f", i ? "," : "", OP_NAMES[i], m->ops[i] * per);
    fprintf(stderr, "}}\n");
    return 0;
}
