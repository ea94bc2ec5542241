// Drives llama_fake_quant_start_at (exported from the patched libllama) on small two-layer ggml graphs
// shaped like a graph builder's: what a graph started at a layer keeps, drops and refuses. Built and
// run by test_start_at_graph.py; prints one JSON object per case on stdout.
//
// The graph: a leaf "inp" (an input), embd = scale(inp); per layer il, kcur-il = scale(prev), written
// into a cache (set_rows-like: a cpy into a view of a leaf, as the KV cache writes are), attn-il =
// add(prev, a view of a cache) and l_out-il = add(prev, attn-il); result_output = scale(l_out-1), the
// graph's output. Layer 1 reads its own cache ("own"), or the cache layer 0 writes ("shared", as
// gemma3n's later layers read the KV of earlier ones); "layer0_leaf" gives layer 0 a leaf of its own;
// "per_layer_input" adds to each layer's attn a tensor computed from embd (as gemma3n's per-layer inputs).

#include "ggml.h"
#include "llama-fake-quant.h"

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

static std::string json_list(const std::vector<std::string> & items) {
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i) {
        out += std::string(i ? ", " : "") + "\"" + items[i] + "\"";
    }
    return out + "]";
}

static void run_case(const char * name, int32_t start, bool shared, bool layer0_leaf, int32_t site_layer,
                     bool per_layer_input = false) {
    const int64_t n = 8;
    ggml_init_params params = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, /*no_alloc=*/ true };
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * inp = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    ggml_set_name(inp, "inp");
    ggml_set_input(inp);
    ggml_tensor * cache[2];
    for (int il = 0; il < 2; ++il) {
        cache[il] = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
        ggml_format_name(cache[il], "cache_k_l%d", il);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_tensor * embd = ggml_scale(ctx, inp, 2.0f);
    ggml_set_name(embd, "embd");
    ggml_tensor * prev = embd;
    std::vector<ggml_tensor *> xs;
    for (int il = 0; il < 2; ++il) {
        ggml_tensor * k = ggml_scale(ctx, prev, 3.0f);
        ggml_format_name(k, "kcur-%d", il);
        if (il == 0 && layer0_leaf) {
            ggml_tensor * bias = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
            ggml_set_name(bias, "bias-0");
            k = ggml_add(ctx, k, bias);
            ggml_format_name(k, "kcur_b-%d", il);
        }
        ggml_tensor * write = ggml_cpy(ctx, k, ggml_view_1d(ctx, cache[il], n, 0));
        ggml_format_name(write, "write-%d", il);
        ggml_build_forward_expand(gf, write); // as the builders expand their cache writes
        ggml_tensor * read = ggml_view_1d(ctx, cache[shared ? 0 : il], n, 0);
        ggml_format_name(read, "read-%d", il);
        ggml_tensor * attn = ggml_add(ctx, prev, read);
        ggml_format_name(attn, "attn-%d", il);
        if (per_layer_input) { // read by the layer, computed from the embedding, not from the residual
            ggml_tensor * pl = ggml_scale(ctx, embd, 5.0f);
            ggml_format_name(pl, "per_layer-%d", il);
            attn = ggml_add(ctx, attn, pl);
            ggml_format_name(attn, "attn_pl-%d", il);
        }
        prev = ggml_add(ctx, prev, attn);
        ggml_format_name(prev, "l_out-%d", il);
        xs.push_back(k);
    }
    ggml_tensor * out = ggml_scale(ctx, prev, 0.5f);
    ggml_set_name(out, "result_output");
    ggml_set_output(out);
    ggml_build_forward_expand(gf, out);
    const int n_before = ggml_graph_n_nodes(gf);

    std::vector<llama_fake_quant_site> sites; // site_layer: a site at kcur-<il>; -2: at embd (no layer); -1: none
    if (site_layer >= 0) {
        sites.push_back({ 0, site_layer, xs[site_layer] });
    } else if (site_layer == -2) {
        sites.push_back({ 0, -1, embd });
    }
    ggml_tensor * input = nullptr;
    int32_t n_skipped = 0;
    std::vector<ggml_tensor *> orphans;
    const std::string err = llama_fake_quant_start_at(gf, start, sites, input, n_skipped, orphans);

    std::vector<std::string> kept;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        kept.push_back(ggml_graph_node(gf, i)->name);
    }
    std::vector<std::string> orphan_names;
    for (const ggml_tensor * o : orphans) {
        orphan_names.push_back(o->name);
    }
    std::string e;
    for (const char c : err) {
        e += c == '"' ? std::string("\\\"") : std::string(1, c);
    }
    printf("{\"case\": \"%s\", \"error\": \"%s\", \"nodes_before\": %d, \"kept\": %s, \"skipped\": %d, \"input\": \"%s\", "
           "\"input_is_input\": %s, \"orphans\": %s}\n",
           name, e.c_str(), n_before, json_list(kept).c_str(), n_skipped, input ? input->name : "",
           input && input->op == GGML_OP_NONE && (input->flags & GGML_TENSOR_FLAG_INPUT) && !input->src[0] ? "true" : "false",
           json_list(orphan_names).c_str());
    ggml_free(ctx);
}

int main() {
    run_case("own",             1, false, false, -1);
    run_case("shared",          1, true,  false, -1);
    run_case("layer0_leaf",     1, false, true,  -1);
    run_case("after_last",      2, false, false, -1);
    run_case("per_layer_input", 1, false, false, -1, true);
    run_case("site_at_start",   1, false, false, 1);
    run_case("site_below",      1, false, false, 0);
    run_case("site_before",     1, false, false, -2);
    run_case("site_before_kept", 1, true, false, -2);
    run_case("no_residual",     3, false, false, -1);
    return 0;
}
