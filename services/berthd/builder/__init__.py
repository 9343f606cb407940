"""The builder service: Dockerfile to image, with a step cache in etcd shared by every builder
instance. RUN steps run on node agents through the cluster; COPY and ADD layers are made here."""
