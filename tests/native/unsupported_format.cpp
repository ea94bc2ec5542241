// Drives llama_fake_quant_rewrite (exported from the patched libllama) on a tiny ggml graph with a
// stub device verdict, to run the error path that no real backend of the test machines reaches:
// the portable implementation needs a cast or copy that the device holding a layer cannot compute.
// Built and run by test_unsupported_format.py; prints one JSON object per case on stdout.
//
// The graph of a case: a leaf "inp", x = scale(inp) named "ffn_norm-0", and its reader
// "out" = add(x, x) (the two-layer case chains a second such block, "ffn_norm-1" and "out-1"; the
// nested case names a reshape of x "ffn_norm-0" too, as the graph builders name Vcur, and out reads
// that). Every case gets a fresh context and graph.

#include "ggml.h"
#include "llama-fake-quant.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static std::string json_str(const std::string & s) {
    std::string out = "\"";
    for (const char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += c;
        } else if ((unsigned char) c < 0x20) {
            char buf[8];
            snprintf(buf, sizeof(buf), "\\u%04x", c);
            out += buf;
        } else {
            out += c;
        }
    }
    return out + "\"";
}

static std::string json_list(const std::vector<std::string> & items) {
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i) {
        out += (i ? ", " : "") + json_str(items[i]);
    }
    return out + "]";
}

// what the stub was asked about: "<op desc> <src0 type> -> <type> il=<il>"
static std::string describe(const ggml_tensor * node, int32_t il) {
    return std::string(ggml_op_desc(node)) + " " + (node->src[0] ? ggml_type_name(node->src[0]->type) : "-") + " -> " +
           ggml_type_name(node->type) + " il=" + std::to_string(il);
}

struct verdict {
    const char * what;                                    // for the JSON line
    bool (*refuses)(const ggml_tensor * node, int32_t il); // the stub device cannot compute node
};

static bool involves(const ggml_tensor * node, ggml_type type) {
    return node->type == type || (node->src[0] && node->src[0]->type == type);
}

static const verdict refuse_q8_0      = { "refuses q8_0", [](const ggml_tensor * n, int32_t) { return involves(n, GGML_TYPE_Q8_0); } };
static const verdict refuse_bf16      = { "refuses bf16", [](const ggml_tensor * n, int32_t) { return involves(n, GGML_TYPE_BF16); } };
static const verdict refuse_nothing   = { "accepts all", [](const ggml_tensor *, int32_t) { return false; } };
static const verdict refuse_everything = { "refuses all", [](const ggml_tensor *, int32_t) { return true; } };
// only the cast back to F32 (bf16 -> f32), not the cast to bf16
static const verdict refuse_bf16_to_f32 = { "refuses bf16 -> f32", [](const ggml_tensor * n, int32_t) {
    return n->src[0] && n->src[0]->type == GGML_TYPE_BF16 && n->type == GGML_TYPE_F32; } };
static const verdict refuse_sub = { "refuses SUB", [](const ggml_tensor * n, int32_t) { return n->op == GGML_OP_SUB; } };
// a device that holds layer 1 only (the real callback asks the device of the site's layer)
static const verdict refuse_q8_0_layer1 = { "refuses q8_0 at layer 1", [](const ggml_tensor * n, int32_t il) {
    return il == 1 && involves(n, GGML_TYPE_Q8_0); } };

// ne0: the row length of x; x_output: x is a graph output (as the logits are: written over on the portable path);
// nested: a second site of x's name, a view of x
static void run_case(const char * name, llama_fake_quant_impl impl, const char * format, float scale, const verdict & v,
                     int n_layers = 1, int64_t ne0 = 64, bool x_output = false, bool nested = false) {
    const size_t graph_size = 64;
    ggml_init_params params = {
        /*.mem_size   =*/ 64 * ggml_tensor_overhead() + ggml_graph_overhead_custom(graph_size, false),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * inp = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, 2);
    ggml_set_name(inp, "inp");
    ggml_set_input(inp);
    std::vector<ggml_tensor *> xs;
    std::vector<ggml_tensor *> readers;
    ggml_tensor * cur = inp;
    for (int il = 0; il < n_layers; ++il) {
        ggml_tensor * x = ggml_scale(ctx, cur, 2.0f);
        ggml_format_name(x, "ffn_norm-%d", il);
        if (x_output) {
            ggml_set_output(x);
        }
        ggml_tensor * read = x;
        if (nested) {
            read = ggml_reshape_2d(ctx, x, ne0, 2);
            ggml_format_name(read, "ffn_norm-%d", il);
        }
        ggml_tensor * reader = ggml_add(ctx, read, read);
        ggml_format_name(reader, "out-%d", il);
        xs.push_back(x);
        readers.push_back(reader);
        cur = reader;
    }
    ggml_set_output(cur);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_size, false);
    ggml_build_forward_expand(gf, cur);
    const int n_nodes_before = ggml_graph_n_nodes(gf);

    llama_fake_quant_config cfg;
    cfg.rules.push_back({ "ffn_norm", nullptr, {}, scale });
    std::string parse_err;
    if (!llama_fake_quant_parse_type(format, cfg.rules.back().format, parse_err)) {
        fprintf(stderr, "%s\n", parse_err.c_str());
        exit(1);
    }
    std::vector<std::string> asked;
    std::vector<std::string> refused;
    const llama_fake_quant_unsupported_fn unsupported = [&](const ggml_tensor * node, int32_t il) -> std::string {
        asked.push_back(describe(node, il));
        if (v.refuses(node, il)) {
            refused.push_back(describe(node, il));
            return "StubGPU";
        }
        return "";
    };
    std::vector<llama_fake_quant_site>  sites;
    std::vector<llama_fake_quant_write> writes;
    const std::string err = llama_fake_quant_rewrite(ctx, gf, cfg, impl, unsupported, /*require_sites=*/ true, sites, writes);
    // the writes over x that llama_context places where the owner's memory is: "<node op> over <owner name> <owner op>"
    std::vector<std::string> written;
    for (const auto & w : writes) {
        written.push_back(std::string(ggml_op_desc(w.node)) + " over " + w.owner->name + " " + ggml_op_desc(w.owner));
    }

    std::vector<std::string> order;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        order.push_back(std::string(node->name) + " " + ggml_op_desc(node));
    }
    // per layer: whether its reader now reads something other than x, what it reads, and whether
    // the site's result (x's name + ".fq") is written over x (a view of x)
    std::vector<std::string> rewired;
    std::vector<std::string> reads;
    std::vector<std::string> over_x;
    for (int il = 0; il < n_layers; ++il) {
        const ggml_tensor * r = readers[il];
        rewired.push_back(r->src[0] != xs[il] || r->src[1] != xs[il] ? "true" : "false");
        reads.push_back(std::string(r->src[0]->name) + ", " + r->src[1]->name);
        const ggml_tensor * y = ggml_graph_get_tensor(gf, (std::string(xs[il]->name) + ".fq").c_str());
        over_x.push_back(y && y->view_src == xs[il] ? "true" : "false");
    }
    std::string site_list;
    for (const auto & s : sites) {
        site_list += std::string(site_list.empty() ? "" : ", ") + "[" + std::to_string(s.rule) + ", " + std::to_string(s.il) + "]";
    }
    std::string rewired_list;
    for (const auto & r : rewired) {
        rewired_list += (rewired_list.empty() ? "" : ", ") + r;
    }
    std::string over_x_list;
    for (const auto & o : over_x) {
        over_x_list += (over_x_list.empty() ? "" : ", ") + o;
    }
    printf("{\"case\": %s, \"impl\": %s, \"format\": %s, \"scale\": %g, \"stub\": %s, \"error\": %s, "
           "\"sites\": [%s], \"rewired\": [%s], \"over_x\": [%s], \"reads\": %s, \"asked\": %s, \"refused\": %s, "
           "\"writes\": %s, \"n_nodes_before\": %d, \"n_nodes_after\": %d, \"order\": %s}\n",
           json_str(name).c_str(), json_str(impl == LLAMA_FAKE_QUANT_IMPL_PORTABLE ? "portable" : "cpu_fused").c_str(),
           json_str(format).c_str(), scale, json_str(v.what).c_str(), json_str(err).c_str(),
           site_list.c_str(), rewired_list.c_str(), over_x_list.c_str(), json_list(reads).c_str(), json_list(asked).c_str(),
           json_list(refused).c_str(), json_list(written).c_str(), n_nodes_before, ggml_graph_n_nodes(gf),
           json_list(order).c_str());
    fflush(stdout);
    ggml_free(ctx);
}

int main() {
    const auto P = LLAMA_FAKE_QUANT_IMPL_PORTABLE;
    const auto F = LLAMA_FAKE_QUANT_IMPL_CPU_FUSED;
    // (a) the device cannot cast to q8_0: the error names the first node it refuses
    run_case("q8_0_refused", P, "q8_0", 1.0f, refuse_q8_0);
    // (b) the same device does have the bf16 and f16 casts
    run_case("bf16_accepted", P, "bf16", 1.0f, refuse_q8_0);
    run_case("f16_accepted", P, "f16", 1.0f, refuse_q8_0);
    // (c) a device with every cast
    run_case("q8_0_accepted", P, "q8_0", 1.0f, refuse_nothing);
    // (d) the fused implementation never asks: llama_context picks it only when every backend is a
    // CPU (has_gpu_backend() false), and a CPU has every cast, so there is no device to ask;
    // llama_fake_quant_rewrite consults `unsupported` only for LLAMA_FAKE_QUANT_IMPL_PORTABLE.
    // For q8_0, build_site has no fused node (bf16/f16 only) and builds the portable casts even
    // under CPU_FUSED, still without asking.
    run_case("q8_0_fused_not_asked", F, "q8_0", 1.0f, refuse_q8_0);
    run_case("bf16_fused_not_asked", F, "bf16", 1.0f, refuse_everything);
    // (e) a device without the bf16 casts: the message names the op and the bf16 types
    run_case("bf16_refused", P, "bf16", 1.0f, refuse_bf16);
    // scale < 1 adds the cast back, a sub, a scale and an add: each is asked about, in graph order
    run_case("bf16_blend_dequant_refused", P, "bf16", 0.5f, refuse_bf16_to_f32);
    run_case("bf16_blend_sub_refused", P, "bf16", 0.5f, refuse_sub);
    // two sites, the second one's device refuses: what the first site's rewrite leaves behind
    run_case("q8_0_second_layer_refused", P, "q8_0", 1.0f, refuse_q8_0_layer1, 2);
    // (f) the formats without a ggml type: custom nodes, computed on the CPU wherever x is, so the
    // device is not asked about them; nvfp4 (a tensor scale) first reads the whole tensor's row maxima
    run_case("mxfp4_portable_not_asked", P, "mxfp4", 1.0f, refuse_everything);
    run_case("nvfp4_portable_not_asked", P, "nvfp4", 0.5f, refuse_everything);
    run_case("nvfp4_fused", F, "nvfp4", 1.0f, refuse_everything);
    // ... except the copy over x where x must keep the result (a graph output such as the logits)
    run_case("mxfp4_output_copy_refused", P, "mxfp4", 1.0f, refuse_everything, 1, 64, true);
    run_case("mxfp4_output_copy_accepted", P, "mxfp4", 1.0f, refuse_nothing, 1, 64, true);
    // ... and the copy over a later site that is a view of an earlier one: it writes into the earlier
    // site's custom node's output, CPU memory (reported, so llama_context places the copy on the CPU)
    run_case("mxfp4_nested_view", P, "mxfp4", 1.0f, refuse_nothing, 1, 64, false, true);
    run_case("bf16_nested_view", P, "bf16", 1.0f, refuse_nothing, 1, 64, false, true);
    // (g) rows that ggml's block formats cannot take (no tensor of the test models has such rows)
    run_case("q8_0_rows_not_multiple", F, "q8_0", 1.0f, refuse_nothing, 1, 100);
    run_case("mxfp4_ggml_rows_not_multiple", P, "mxfp4_ggml", 1.0f, refuse_nothing, 1, 100);
    run_case("mxfp4_rows_not_multiple", F, "mxfp4", 1.0f, refuse_nothing, 1, 100);
    return 0;
}
