"""The Q-Former of BLIP-2 (Li et al. 2023): a small BERT that turns image features into a few tokens.

    QFormerConfig -> Attention, FeedForward -> QFormerLayer x n_layers -> QFormer
                  -> the BLIP-2 stage-1 losses (ITC, ITM) -> loading BLIP-2, BERT and DistilBERT checkpoints
                     (their key maps: layouts.py)

Learned query tokens (32 of width 768 in BLIP-2) run through BERT-style post-LN layers. They attend
to each other in every layer, and to the frozen vision tower's patch features (of width `encoder_dim`)
every `cross_attention_frequency`-th layer; their outputs, (B, n_queries, dim) whatever the number of
patches, are the image as the LM sees it.

The layers also read text, sharing the self-attention and with a feed-forward of its own: that is how
BLIP-2 trains the queries in stage 1 (its third objective, ITG, needs an LM head and is not here).
  ITC, image-text contrastive: queries and text never see each other, so they run in two passes
      (`image_features`, `text_features`, `itc_loss` with a learned temperature).
  ITM, image-text matching: one pass in which all see each other (`itm_logits`, `itm_loss` with hard
      negatives mined from the ITC similarities).

Checkpoints (names as in transformers' modeling_blip_2.py): `from_pretrained` reads BLIP-2's, a
`Blip2QFormerModel` saved alone or our own folders; `from_bert` starts as BLIP-2 does, from BERT.
"""

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (WEIGHT_FILES, CheckpointError, checkpoint_folder, load_state, read_json, read_safetensors,
                         write_checkpoint)
from configs import ACTIVATIONS, bert_qformer_settings, bert_state, blip2_name, blip2_qformer_settings, build_config
from layouts import (BERT_HEADS, BERT_IGNORED, BLIP2_IGNORED, BLIP2_PREFIXES, BLIP2_QFORMER_INPUTS, bert_key_map,
                     blip2_key_map)

GLIMPSE_TYPE = "glimpse-qformer"  # config.json's model_type in folders QFormer.save_pretrained writes


@dataclass
class QFormerConfig:
    dim: int = 768  # hidden_size of the queries and the text
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # feed-forward inner size (intermediate_size)
    act: str = "gelu"  # "gelu" (exact, BERT and BLIP-2), "gelu_tanh", "relu": configs.ACTIVATIONS
    norm_eps: float = 1e-12
    dropout: float = 0.1  # on attention probabilities and on every residual branch, in training only
    n_queries: int = 32  # learned query tokens (num_query_tokens)
    encoder_dim: int = 1408  # width of the image features the queries cross-attend to (EVA ViT-g: 1408)
    cross_attention_frequency: int = 2  # layers 0, f, 2f, ... cross-attend to the image
    # the text side: word + position embeddings and a feed-forward of its own in every layer
    text: bool = True
    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary
    max_positions: int = 512
    pad_token_id: int = 0
    # stage-1 heads: linear maps into the shared image-text space (None: none), and the ITM classifier
    proj_dim: int | None = 256  # image_text_hidden_size
    itm_head: bool = True
    temperature: float = 0.07  # initial value of the learned ITC temperature
    init_std: float = 0.02  # BERT's initializer_range, for everything built fresh

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is not supported; supported: {sorted(ACTIVATIONS)}")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with a post-LN residual: LayerNorm(x + o(attention(q(x), k(c), v(c)))).
    Self-attention when the context c is x; cross-attention when c holds the image features (of
    width `kv_dim`). HF: `attention.attention.{query,key,value}`, `attention.output.{dense,LayerNorm}`."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(kv_dim, cfg.dim)
        self.v = nn.Linear(kv_dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, context, mask=None):  # x (B, L, D), context (B, S, Dc), mask (B, 1, L|1, S) bool
        B, L, D = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        k = self.k(context).view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, H, S, hd)
        v = self.v(context).view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, H, S, hd)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, L, hd)
        y = self.o(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
        return self.norm(x + F.dropout(y, self.dropout, self.training))  # (B, L, D)


class FeedForward(nn.Module):
    """LayerNorm(x + fc2(act(fc1(x)))). HF: `intermediate[_query].dense`, `output[_query].{dense,LayerNorm}`."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.dropout = cfg.dropout
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x):  # (B, L, D)
        y = self.fc2(self.act(self.fc1(x)))  # (B, L, D)
        return self.norm(x + F.dropout(y, self.dropout, self.training))


class QFormerLayer(nn.Module):
    """Self-attention over queries and text together; then, for the queries only, cross-attention to
    the image (in cross-attention layers) and the query feed-forward; the text its own feed-forward."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg, kv_dim=cfg.dim)
        self.cross_attn = Attention(cfg, kv_dim=cfg.encoder_dim) if index % cfg.cross_attention_frequency == 0 else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg) if cfg.text else None

    def forward(self, x, n_queries: int, mask=None, image=None, image_mask=None):
        """x (B, n_queries + T, D): the queries first, then the text (either part may be empty)."""
        x = self.self_attn(x, x, mask)  # (B, Q + T, D)
        queries, text = x[:, :n_queries], x[:, n_queries:]  # (B, Q, D), (B, T, D)
        if n_queries:
            if self.cross_attn is not None:
                if image is None:
                    raise ValueError("the queries need image features: this layer cross-attends to them")
                queries = self.cross_attn(queries, image, image_mask)  # (B, Q, D)
            queries = self.query_ffn(queries)  # (B, Q, D)
        if text.shape[1]:
            text = self.text_ffn(text)  # (B, T, D)
        return torch.cat((queries, text), dim=1)  # (B, n_queries + T, D)


# ---------------------------------------------------------------------------------------------
# The Q-Former, and the stage-1 losses its ITC and ITM heads train with
# ---------------------------------------------------------------------------------------------


def padding_mask(mask):
    """(B, S) with 1/True at real tokens or patches -> (B, 1, 1, S), or None for None. A row with nothing
    to attend to (a padding-only text) would give NaN: it attends to everything (it is padding anyway)."""
    if mask is None:
        return None
    mask = mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    return mask | ~mask.any(dim=-1, keepdim=True)


class QFormer(nn.Module):
    """image features (B, N, encoder_dim) -> query outputs (B, n_queries, dim); text ids (B, T) ->
    text states (B, T, dim); and the two together for image-text matching."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not a multiple of n_heads {cfg.n_heads}")
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.n_queries, cfg.dim))  # (1, Q, D)
        if cfg.text:
            self.word_embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
            self.pos_embed = nn.Embedding(cfg.max_positions, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # on queries and text embeddings alike
        self.layers = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.n_layers))
        if cfg.proj_dim is not None:
            self.vision_proj = nn.Linear(cfg.dim, cfg.proj_dim)
            self.text_proj = nn.Linear(cfg.dim, cfg.proj_dim)
        if cfg.itm_head:
            self.itm_head = nn.Linear(cfg.dim, 2)  # logits of (no match, match)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))  # the ITC temperature, learned
        self.apply(self._init)

    def _init(self, module):
        """BERT's initialisation, for what a checkpoint does not fill (a no-op on the meta device)."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif module is self:
            nn.init.normal_(self.query_tokens, std=std)

    # --- the layers, shared by every path ---

    def run(self, x, n_queries: int, mask=None, image=None, image_mask=None):
        """Embeddings (B, L, D) (queries first) -> the last layer's states (B, L, D)."""
        x = F.dropout(self.embed_norm(x), self.config.dropout, self.training)  # (B, L, D)
        if image is not None:
            image = image.to(x.dtype)
        image_mask = padding_mask(image_mask)
        for layer in self.layers:
            x = layer(x, n_queries, mask, image, image_mask)  # (B, L, D)
        return x

    def embed_text(self, input_ids):  # (B, T) -> (B, T, D): word + position embeddings, before the LayerNorm
        if not self.config.text:
            raise ValueError("this Q-Former has no text side (a checkpoint such as blip2-opt-2.7b keeps only "
                             "the query path); build one with QFormerConfig(text=True) or QFormer.from_bert")
        T = input_ids.shape[1]
        if T > self.config.max_positions:
            raise ValueError(f"{T} text tokens, more than the {self.config.max_positions} positions")
        return self.word_embed(input_ids) + self.pos_embed(torch.arange(T, device=input_ids.device))  # (B, T, D)

    def forward(self, image_embeds, image_mask=None):
        """image_embeds (B, N, encoder_dim), image_mask (B, N) 1 at real patches -> (B, n_queries, D):
        what HF's Blip2QFormerModel(query_embeds=query_tokens, encoder_hidden_states=...) returns."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D)
        return self.run(queries, self.config.n_queries, image=image_embeds, image_mask=image_mask)

    def encode_text(self, input_ids, attention_mask=None):
        """input_ids (B, T), attention_mask (B, T) 1 at real tokens -> (B, T, D), bidirectional over
        the text alone (no queries, no image). The first token's ([CLS]) state is the text feature."""
        return self.run(self.embed_text(input_ids), 0, padding_mask(attention_mask))

    def encode_joint(self, image_embeds, input_ids, attention_mask=None, image_mask=None):
        """Queries and text in one pass, all seeing each other but the text's padding (ITM's
        bidirectional mask) -> (B, n_queries + T, D)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)  # (B, T)
        queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, D)
        x = torch.cat((queries, self.embed_text(input_ids).to(queries.dtype)), dim=1)  # (B, Q + T, D)
        real = torch.ones(B, self.config.n_queries, dtype=torch.bool, device=input_ids.device)  # (B, Q)
        mask = padding_mask(torch.cat((real, attention_mask.bool()), dim=1))  # (B, 1, 1, Q + T)
        return self.run(x, self.config.n_queries, mask, image_embeds, image_mask)

    # --- stage 1: the contrastive (ITC) and matching (ITM) heads ---

    def image_features(self, image_embeds, image_mask=None):  # -> (B, n_queries, proj_dim), unit length
        return F.normalize(self.vision_proj(self(image_embeds, image_mask)), dim=-1)

    def text_features(self, input_ids, attention_mask=None):  # -> (B, proj_dim), unit length
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def temperature(self):
        """The learned ITC temperature within [0.001, 0.5] (BLIP-2 clamps its parameter in place before
        each step; here the value is clamped as it is read, the parameter left as it is)."""
        return self.temp.clamp(0.001, 0.5)

    def itm_logits(self, image_embeds, input_ids, attention_mask=None, image_mask=None):
        """(B, 2) logits of (no match, match): the ITM head on each query's output after a joint
        bidirectional pass, averaged over the queries (HF Blip2ForImageTextRetrieval's ITM path)."""
        x = self.encode_joint(image_embeds, input_ids, attention_mask, image_mask)  # (B, Q + T, D)
        return self.itm_head(x[:, : self.config.n_queries]).mean(dim=1)  # (B, 2)

    def itm_loss(self, image_embeds, input_ids, attention_mask, sim, image_mask=None, positives=None,
                 generator=None):
        """BLIP-2's ITM loss: the B matching pairs, and for each image a hard negative text and for each
        text a hard negative image, sampled by `hard_negatives` from the ITC similarities sim (B, B).
        A 2-way cross-entropy over the 3B pairs."""
        B = input_ids.shape[0]
        neg_text, neg_image = hard_negatives(sim, positives, generator)
        images = torch.cat((image_embeds, image_embeds, image_embeds[neg_image]))  # (3B, N, Dv)
        ids = torch.cat((input_ids, input_ids[neg_text], input_ids))  # (3B, T)
        mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask[neg_text], attention_mask))
        img_mask = None if image_mask is None else torch.cat((image_mask, image_mask, image_mask[neg_image]))
        logits = self.itm_logits(images, ids, mask, img_mask)  # (3B, 2)
        labels = torch.cat((torch.ones(B), torch.zeros(2 * B))).long().to(logits.device)  # (3B,)
        return F.cross_entropy(logits, labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=torch.float32, device="cpu", n_queries: int = 32) -> "QFormer":
        """The Q-Former of an HF BLIP-2 checkpoint (hub id or folder), a Blip2QFormerModel saved alone,
        or a folder our `save_pretrained` wrote. A Blip2QFormerModel takes its query tokens (and text
        embeddings) as input, so its file has none: they start fresh (BERT's init), `n_queries` of them."""
        folder = checkpoint_folder(name_or_path, WEIGHT_FILES)
        hf = read_json(f"{folder}/config.json")
        if hf.get("model_type") == GLIMPSE_TYPE:  # our own names, all of them
            cfg = build_config(QFormerConfig, hf)
            return load_state(cls, cfg, read_safetensors(folder), None, dtype, device, folder)
        if hf.get("model_type") == "blip_2_qformer":
            state = {blip2_name("qformer." + k): v for k, v in read_safetensors(folder).items()}
            blip2 = {"qformer_config": hf, "num_query_tokens": n_queries,
                     "vision_config": {"hidden_size": hf.get("encoder_hidden_size", 1408)}}
            cfg = build_config(QFormerConfig, blip2_qformer_settings(blip2, set(state)))
            key_map = {k: v for k, v in blip2_key_map(cfg).items() if k not in BLIP2_QFORMER_INPUTS}
            return load_state(cls, cfg, state, key_map, dtype, device, folder, ignore=BLIP2_IGNORED, fresh=True)
        if hf.get("model_type") != "blip-2":
            raise CheckpointError(f"config.json describes a {hf.get('model_type')!r} model; QFormer.from_pretrained "
                                  "loads 'blip-2' and 'blip_2_qformer' checkpoints (from_bert: bert, distilbert)")
        state = read_safetensors(folder, keep=lambda k: k.startswith(BLIP2_PREFIXES))  # no tower, no LM
        state = {blip2_name(k): v for k, v in state.items()}
        cfg = build_config(QFormerConfig, blip2_qformer_settings(hf, set(state)))
        state["temp"] = torch.tensor(cfg.temperature)  # HF keeps no ITC temperature: it starts at the config's
        key_map = {**blip2_key_map(cfg), "temp": "temp"}
        return load_state(cls, cfg, state, key_map, dtype, device, folder, ignore=BLIP2_IGNORED)

    @classmethod
    def from_bert(cls, name_or_path: str, encoder_dim: int = 1408, n_queries: int = 32,
                  cross_attention_frequency: int = 2, proj_dim: int | None = 256, dtype=torch.float32,
                  device="cpu") -> "QFormer":
        """BLIP-2's start, from a BERT or DistilBERT checkpoint: its embeddings, self-attention and
        feed-forward fill the text side, and the query feed-forward starts as a copy of the text one;
        cross-attention (to features of width `encoder_dim`), queries and heads are fresh (BERT's init,
        from torch's RNG). In eval mode, like from_pretrained: .train() turns dropout on."""
        folder = checkpoint_folder(name_or_path, WEIGHT_FILES)
        hf = read_json(f"{folder}/config.json")
        kind = hf.get("model_type")
        cfg = replace(build_config(QFormerConfig, bert_qformer_settings(hf)), encoder_dim=encoder_dim,
                      n_queries=n_queries, cross_attention_frequency=cross_attention_frequency, proj_dim=proj_dim)
        state = bert_state(read_safetensors(folder, keep=lambda k: not k.startswith(BERT_HEADS)), kind)
        return load_state(cls, cfg, state, bert_key_map(cfg, kind), dtype, device, folder, ignore=BERT_IGNORED,
                          fresh=True)

    def save_pretrained(self, folder: str):
        """config.json (our config) and model.safetensors (our names), readable by from_pretrained."""
        write_checkpoint(folder, {"model_type": GLIMPSE_TYPE, **asdict(self.config)}, self.state_dict())


def similarity(image_feats, text_feats):
    """image_feats (Bi, Q, d), text_feats (Bt, d) -> (Bi, Bt): for each image and text, the largest
    similarity between the text and any of the image's queries (BLIP-2's image-text similarity)."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)  # (Bi, Bt)


def itc_loss(image_feats, text_feats, temperature, label_smoothing: float = 0.1, positives=None):
    """BLIP-2's image-text contrastive loss on a batch of B matching pairs: image_feats (B, Q, d) and
    text_feats (B, d), both unit length; the similarity of `similarity` divided by the temperature,
    cross-entropy over the texts for each image and over the images for each text, averaged. BLIP-2
    smooths the labels by 0.1. `positives` (B, B) bool marks further matching pairs (two images with
    the same caption): the target then spreads evenly over every positive."""
    logits = similarity(image_feats, text_feats) / temperature  # (B, B): rows images, columns texts
    if positives is None:
        targets = torch.arange(logits.shape[0], device=logits.device)  # (B,)
        return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
                + F.cross_entropy(logits.t(), targets, label_smoothing=label_smoothing)) / 2
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), targets.t() / targets.t().sum(dim=1, keepdim=True),
                              label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def hard_negatives(sim, positives=None, generator=None):
    """For ITM: sim (B, B) image-text similarities (rows images) -> (a text index for each image, an
    image index for each text), each drawn with probability softmax(sim) over the non-positive pairs,
    so similar-looking wrong pairs are picked most. positives (B, B) bool marks pairs that must not be
    drawn (default: the diagonal; add the pairs of duplicate images or captions)."""
    B = sim.shape[0]
    if positives is None:
        positives = torch.eye(B, dtype=torch.bool, device=sim.device)  # (B, B)
    if bool(positives.all(dim=1).any()) or bool(positives.all(dim=0).any()):
        raise ValueError("hard negatives need, for every image and every text, a pair that is not positive")
    sim = sim.float()
    weights_i2t = (sim.softmax(dim=1) + 1e-4).masked_fill(positives, 0)  # (B images, B texts)
    weights_t2i = (sim.t().softmax(dim=1) + 1e-4).masked_fill(positives.t(), 0)  # (B texts, B images)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (B,)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (B,)
    return neg_text, neg_image
